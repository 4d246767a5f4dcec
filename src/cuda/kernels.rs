//! The kernels of `cuda-kernels/` in one table: each family's name, the
//! source file (and so the PTX module) it lives in, the dtypes it is
//! instantiated for (the name then ends in `_f32`, `_f64`, `_f16` or
//! `_bf16`) and its parameters, as C types with `T` for the input type.
//!
//! The launch code checks every kernel it loads against the table (in debug
//! builds), and so do the emulator's tests; the tests below check the table
//! against the `extern "C"` declarations of the sources (after the C
//! preprocessor, which expands the instantiation macros) and against the
//! emulated driver's registry (`tests/cuda-emulator/fake_driver.cpp`), so
//! that a kernel added, renamed or re-typed in one place and not the others
//! fails a test.

use candle::DType;

/// The input dtypes of the kernels (and of the layer): the `.cu` files
/// instantiate every dtype-generic family for each.
pub(crate) const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];
/// The accumulator dtypes (the coefficient kernels' suffixes).
pub(crate) const ACC_DTYPES: [DType; 2] = [DType::F32, DType::F64];
/// The half dtypes (the half-precision fast paths).
pub(crate) const HALF_DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// One family of kernels (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kernel {
    /// The source file in `cuda-kernels/`.
    pub file: &'static str,
    /// The name, without the dtype suffix.
    pub name: &'static str,
    /// The dtypes it is instantiated for (empty: one kernel, no suffix).
    pub dtypes: &'static [DType],
    /// Its parameters: C types without `const` and `__restrict__`, `T` for
    /// the input type.
    pub params: &'static [&'static str],
}

/// The parameters of `bn_stats_major*`: input, chunk length, chunks, group, partial sums.
const STATS_MAJOR: &[&str] = &["T*", "View", "long long", "long long", "int", "double*"];

/// The parameters of `bn_stats_inner*`: input, rows per block, partial sums.
const STATS_INNER: &[&str] = &["T*", "View", "long long", "double*"];

/// The parameters of `bn_stats_combine` and `bn_grad_combine`: partial sums, channels, parts, output.
const COMBINE: &[&str] = &["double*", "long long", "long long", "double*"];

/// The parameters of `bn_grad_major*`: dy, x, moments, chunk length, chunks, group, partial sums.
const GRAD_MAJOR: &[&str] = &[
    "T*",
    "View",
    "T*",
    "View",
    "void*",
    "Mat2",
    "long long",
    "long long",
    "int",
    "double*",
];

/// The parameters of `bn_grad_relu_major*`: dy, x, moments, ReLU coefficients, chunk length, chunks, group, partial sums.
const GRAD_RELU_MAJOR: &[&str] = &[
    "T*",
    "View",
    "T*",
    "View",
    "void*",
    "Mat2",
    "Traits<T>::Acc*",
    "long long",
    "long long",
    "int",
    "double*",
];

/// The parameters of `bn_grad_inner*`: dy, x, moments, rows per block, partial sums.
const GRAD_INNER: &[&str] = &[
    "T*",
    "View",
    "T*",
    "View",
    "void*",
    "Mat2",
    "long long",
    "double*",
];

/// The parameters of `bn_grad_relu_inner*`: dy, x, moments, ReLU coefficients, rows per block, partial sums.
const GRAD_RELU_INNER: &[&str] = &[
    "T*",
    "View",
    "T*",
    "View",
    "void*",
    "Mat2",
    "Traits<T>::Acc*",
    "long long",
    "double*",
];

/// The parameters of `bn_normalize*`: input, output, coefficients, mode, ReLU.
const ONE_INPUT: &[&str] = &["T*", "View", "T*", "View", "Traits<T>::Acc*", "int", "int"];

/// The parameters of `bn_normalize_add*`, `bn_input_grad*`: two inputs, the output, coefficients, mode, ReLU.
const TWO_INPUTS: &[&str] = &[
    "T*",
    "View",
    "T*",
    "View",
    "T*",
    "View",
    "Traits<T>::Acc*",
    "int",
    "int",
];

/// Every kernel of `cuda-kernels/`, the test-only ones (`SYNCBN_TEST_KERNELS`)
/// included.
pub(crate) const KERNELS: &[Kernel] = &[
    Kernel {
        file: "stats.cu",
        name: "bn_stats_major",
        dtypes: &DTYPES,
        params: STATS_MAJOR,
    },
    Kernel {
        file: "stats.cu",
        name: "bn_stats_major_scalar",
        dtypes: &DTYPES,
        params: STATS_MAJOR,
    },
    Kernel {
        file: "stats.cu",
        name: "bn_stats_inner",
        dtypes: &DTYPES,
        params: STATS_INNER,
    },
    Kernel {
        file: "stats.cu",
        name: "bn_stats_inner_scalar",
        dtypes: &DTYPES,
        params: STATS_INNER,
    },
    Kernel {
        file: "stats.cu",
        name: "bn_stats_major_half",
        dtypes: &HALF_DTYPES,
        params: STATS_MAJOR,
    },
    Kernel {
        file: "stats.cu",
        name: "bn_stats_combine",
        dtypes: &[],
        params: COMBINE,
    },
    Kernel {
        file: "stats.cu",
        name: "bn_moments_from_sums",
        dtypes: &[],
        params: &["void*", "Mat2", "long long", "double", "double*"],
    },
    Kernel {
        file: "stats.cu",
        name: "bn_moments_from_running",
        dtypes: &[],
        params: &[
            "void*",
            "Vec1",
            "void*",
            "Vec1",
            "long long",
            "double",
            "double*",
            "void*",
            "Vec1",
            "void*",
            "Vec1",
            "void*",
            "int",
        ],
    },
    Kernel {
        file: "stats.cu",
        name: "bn_running_update",
        dtypes: &[],
        params: &[
            "void*",
            "Vec1",
            "void*",
            "Mat2",
            "void*",
            "Vec1",
            "long long",
            "int",
            "double",
            "int",
        ],
    },
    Kernel {
        file: "stats.cu",
        name: "bn_batch_moments",
        dtypes: &[],
        params: &[
            "void*",
            "Mat2",
            "void*",
            "Vec1",
            "void*",
            "Vec1",
            "void*",
            "Vec1",
            "long long",
            "long long",
            "int",
            "double",
            "double",
            "double*",
            "void*",
            "Vec1",
            "void*",
            "Vec1",
            "void*",
            "int",
        ],
    },
    Kernel {
        file: "stats.cu",
        name: "bn_counter_increment",
        dtypes: &[],
        params: &["void*", "Vec1", "long long"],
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_major",
        dtypes: &DTYPES,
        params: GRAD_MAJOR,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_relu_major",
        dtypes: &DTYPES,
        params: GRAD_RELU_MAJOR,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_major_scalar",
        dtypes: &DTYPES,
        params: GRAD_MAJOR,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_relu_major_scalar",
        dtypes: &DTYPES,
        params: GRAD_RELU_MAJOR,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_inner",
        dtypes: &DTYPES,
        params: GRAD_INNER,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_relu_inner",
        dtypes: &DTYPES,
        params: GRAD_RELU_INNER,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_inner_scalar",
        dtypes: &DTYPES,
        params: GRAD_INNER,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_relu_inner_scalar",
        dtypes: &DTYPES,
        params: GRAD_RELU_INNER,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_affine_grads",
        dtypes: &DTYPES,
        params: &["void*", "Mat2", "void*", "Mat2", "long long", "T*"],
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_major_half",
        dtypes: &HALF_DTYPES,
        params: GRAD_MAJOR,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_relu_major_half",
        dtypes: &HALF_DTYPES,
        params: GRAD_RELU_MAJOR,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_combine",
        dtypes: &[],
        params: COMBINE,
    },
    Kernel {
        file: "grad.cu",
        name: "bn_grad_combine_affine",
        dtypes: &[],
        params: &[
            "double*",
            "long long",
            "long long",
            "double*",
            "void*",
            "Mat2",
            "void*",
            "Mat2",
        ],
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_coef_normalize",
        dtypes: &ACC_DTYPES,
        params: &[
            "void*",
            "Mat2",
            "void*",
            "Vec1",
            "void*",
            "Vec1",
            "long long",
            "T*",
        ],
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_coef_input_grad",
        dtypes: &ACC_DTYPES,
        params: &[
            "void*",
            "Mat2",
            "void*",
            "Vec1",
            "void*",
            "Mat2",
            "void*",
            "Vec1",
            "void*",
            "Vec1",
            "int",
            "long long",
            "T*",
        ],
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_stack_params",
        dtypes: &[],
        params: &[
            "void*",
            "Vec1",
            "void*",
            "Vec1",
            "void*",
            "int",
            "long long",
        ],
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_normalize",
        dtypes: &DTYPES,
        params: ONE_INPUT,
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_normalize_add",
        dtypes: &DTYPES,
        params: TWO_INPUTS,
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_input_grad",
        dtypes: &DTYPES,
        params: TWO_INPUTS,
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_normalize_rows",
        dtypes: &DTYPES,
        params: ONE_INPUT,
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_normalize_add_rows",
        dtypes: &DTYPES,
        params: TWO_INPUTS,
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_input_grad_rows",
        dtypes: &DTYPES,
        params: TWO_INPUTS,
    },
    Kernel {
        file: "elementwise.cu",
        name: "bn_relu_grad",
        dtypes: &DTYPES,
        params: &["T*", "View", "T*", "View", "T*", "View", "int"],
    },
];

/// The family of the kernel `name` (a family's name, with its dtype suffix
/// when it has dtypes) and that dtype.
pub(crate) fn find(name: &str) -> Option<(&'static Kernel, Option<DType>)> {
    KERNELS.iter().find_map(|k| {
        if k.dtypes.is_empty() {
            return (k.name == name).then_some((k, None));
        }
        let suffix = name.strip_prefix(k.name)?.strip_prefix('_')?;
        let dtype = k.dtypes.iter().find(|d| d.as_str() == suffix)?;
        Some((k, Some(*dtype)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::process::Command;

    /// The C type of an input dtype, as the `.cu` files name it.
    fn c_type(dtype: DType) -> &'static str {
        match dtype {
            DType::F32 => "float",
            DType::F64 => "double",
            DType::F16 => "__half",
            DType::BF16 => "__nv_bfloat16",
            other => panic!("no kernels for {other:?}"),
        }
    }

    /// Every kernel of the table: its full name, file and parameters.
    fn table() -> BTreeMap<String, (&'static str, Vec<String>)> {
        let mut out = BTreeMap::new();
        for k in KERNELS {
            let instances: Vec<(String, Option<DType>)> = if k.dtypes.is_empty() {
                vec![(k.name.to_string(), None)]
            } else {
                k.dtypes
                    .iter()
                    .map(|d| (format!("{}_{}", k.name, d.as_str()), Some(*d)))
                    .collect()
            };
            for (name, dtype) in instances {
                let params = k
                    .params
                    .iter()
                    .map(|p| match dtype {
                        Some(d) => replace_word(p, "T", c_type(d)),
                        None => p.to_string(),
                    })
                    .collect();
                assert!(
                    out.insert(name.clone(), (k.file, params)).is_none(),
                    "{name} twice"
                );
            }
        }
        out
    }

    /// `text` with every whole-word `word` replaced by `by`.
    fn replace_word(text: &str, word: &str, by: &str) -> String {
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(word) {
            let before = rest[..i].chars().next_back();
            let after = rest[i + word.len()..].chars().next();
            out.push_str(&rest[..i]);
            if before.is_some_and(ident) || after.is_some_and(ident) {
                out.push_str(word);
            } else {
                out.push_str(by);
            }
            rest = &rest[i + word.len()..];
        }
        out.push_str(rest);
        out
    }

    /// A parameter's C type: without `const`, `__restrict__`, `typename`
    /// and its name.
    fn param_type(param: &str) -> String {
        let param = param.replace('*', " * ");
        let mut toks: Vec<&str> = param
            .split_whitespace()
            .filter(|t| !matches!(*t, "const" | "__restrict__" | "typename"))
            .collect();
        let is_name = |t: &str| {
            t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !matches!(t, "int" | "long" | "double" | "float")
        };
        if toks.len() > 1 && toks.last().is_some_and(|t| is_name(t)) {
            toks.pop();
        }
        toks.join(" ").replace(" *", "*")
    }

    /// The `extern "C"` kernels of the preprocessed source `text`: name ->
    /// parameter types.
    fn kernels_of(text: &str) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        let marker = "extern \"C\" __global__ void";
        for (at, _) in text.match_indices(marker) {
            let rest = &text[at + marker.len()..];
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix("__launch_bounds__") {
                Some(r) => &r[r.find(')').expect("launch bounds") + 1..],
                None => rest,
            };
            let open = rest.find('(').expect("parameter list");
            let name = rest[..open].trim().to_string();
            let close = rest[open..].find(')').expect("end of the parameters") + open;
            let mut list = rest[open + 1..close].to_string();
            while let Some(s) = list.find("/*") {
                let e = list[s..].find("*/").expect("end of comment") + s;
                list.replace_range(s..e + 2, "");
            }
            let params = list.split(',').map(param_type).collect();
            assert!(out.insert(name.clone(), params).is_none(), "{name} twice");
        }
        out
    }

    /// `$CXX -E` of `file` as the emulator compiles it; `None` (the test is
    /// skipped) without a C++ compiler.
    fn preprocess(file: &Path) -> Option<String> {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
        let out = match Command::new(&cxx)
            .args(["-std=c++17", "-E", "-P", "-DSYNCBN_TEST_KERNELS", "-I"])
            .arg(manifest.join("tests").join("cuda-emulator").join("include"))
            .args(["-x", "c++"])
            .arg(file)
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("kernel table check skipped: no C++ compiler `{cxx}` ({e})");
                return None;
            }
        };
        assert!(
            out.status.success(),
            "`{cxx} -E {}` failed:\n{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8(out.stdout).expect("UTF-8 source"))
    }

    /// The table lists exactly the kernels of `cuda-kernels/*.cu`, each in
    /// its file, with its parameter types.
    #[test]
    fn table_matches_the_kernel_sources() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda-kernels");
        let mut files: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        files.sort();
        let mut found = BTreeMap::new();
        for f in &files {
            let Some(text) = preprocess(f) else { return };
            let file = f.file_name().unwrap().to_str().unwrap().to_string();
            for (name, params) in kernels_of(&text) {
                found.insert(name, (file.clone(), params));
            }
        }
        let want: BTreeMap<String, (String, Vec<String>)> = table()
            .into_iter()
            .map(|(n, (f, p))| (n, (f.to_string(), p)))
            .collect();
        let mut problems = Vec::new();
        for (name, (file, params)) in &found {
            match want.get(name) {
                None => problems.push(format!("{file}: {name} is not in src/cuda/kernels.rs")),
                Some(w) if w != &(file.clone(), params.clone()) => problems.push(format!(
                    "{name}: the table says {} ({}), {file} says ({})",
                    w.0,
                    w.1.join(", "),
                    params.join(", ")
                )),
                Some(_) => {}
            }
        }
        for name in want.keys().filter(|n| !found.contains_key(*n)) {
            problems.push(format!("{name} is in the table, in no .cu file"));
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        assert!(found.len() >= KERNELS.len(), "{found:?}");
    }

    /// The emulated driver registers exactly the table's kernels.
    #[test]
    fn emulated_driver_registers_every_kernel() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join("cuda-emulator")
            .join("fake_driver.cpp");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!(
                "skipped: no {} (the crate package leaves it out)",
                path.display()
            );
            return;
        };
        let mut registered = std::collections::BTreeSet::new();
        for (macro_name, typed) in [("SYNCBN_TYPED(", true), ("SYNCBN_KERNEL(", false)] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = &text[at + macro_name.len()..];
                let arg = &rest[..rest.find(')').unwrap()];
                if arg == "prefix" || arg.contains("##") {
                    continue; // the macro's definition
                }
                if typed {
                    for d in DTYPES {
                        registered.insert(format!("{arg}_{}", d.as_str()));
                    }
                } else {
                    registered.insert(arg.to_string());
                }
            }
        }
        let want: std::collections::BTreeSet<String> = table().into_keys().collect();
        let missing: Vec<&String> = want.difference(&registered).collect();
        let extra: Vec<&String> = registered.difference(&want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "fake_driver.cpp lacks {missing:?} and registers {extra:?}, which the table does not list"
        );
    }

    #[test]
    fn names_resolve_to_their_family_and_dtype() {
        let (k, d) = find("bn_normalize_add_rows_bf16").unwrap();
        assert_eq!((k.name, d), ("bn_normalize_add_rows", Some(DType::BF16)));
        let (k, d) = find("bn_stats_major_half_f16").unwrap();
        assert_eq!((k.name, d), ("bn_stats_major_half", Some(DType::F16)));
        assert_eq!(find("bn_stats_combine").unwrap().1, None);
        assert!(find("bn_coef_normalize_f16").is_none());
        assert!(find("bn_stats_combine_f32").is_none());
        assert!(find("bn_normalize").is_none());
    }
}
