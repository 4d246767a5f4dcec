//! Build script: under the `cuda` feature, compiles every `cuda-kernels/*.cu`
//! to PTX with `cudaforge` (which builds candle's own kernels) and writes
//! `$OUT_DIR/cuda_kernels.rs`, one `pub const STEM: &str` (the PTX text) per
//! kernel file. Without `cuda` it does nothing. With `internals` (the tests
//! and benchmarks) it also compiles the kernels only they launch
//! (`SYNCBN_TEST_KERNELS`).
//!
//! nvcc: `NVCC`, else `$CUDA_HOME/bin/nvcc` or `$CUDA_PATH/bin/nvcc`, else
//! `PATH`, else the usual install folders (`/usr/local/cuda`, ...). Target:
//! `CUDA_COMPUTE_CAP` (e.g. `90`), else the first GPU `nvidia-smi` reports;
//! from 9.0 on, cudaforge targets the architecture-specific variant
//! (`compute_90a`), as for candle's kernels in the same build.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use cudaforge::{Error, KernelBuilder};
    use std::env;
    use std::path::{Path, PathBuf};

    pub fn build() {
        for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        // Cargo watches the folder recursively: kernels and headers, added,
        // removed or changed.
        println!("cargo:rerun-if-changed=cuda-kernels");

        let mut builder = KernelBuilder::new()
            .source_glob("cuda-kernels/*.cu")
            .args(["-O3", "-std=c++17", "-lineinfo"])
            // This script reruns only when a source or the toolchain changed;
            // cudaforge's own cache would not notice a new nvcc.
            .no_incremental();
        // Kernels that only the tests and benchmarks launch (the ops' own
        // CUDA paths behind the `internals` feature); users' builds omit them.
        if env::var_os("CARGO_FEATURE_INTERNALS").is_some() {
            builder = builder.arg("-DSYNCBN_TEST_KERNELS");
        }
        match env::var_os("NVCC").filter(|v| !v.is_empty()) {
            // cudaforge runs NVCC when it exists and otherwise silently looks
            // elsewhere: a mistyped NVCC must not pick another nvcc.
            Some(nvcc) => {
                let nvcc = Path::new(&nvcc);
                if nvcc.components().count() > 1 && !nvcc.is_file() {
                    panic!(
                        "\n\nNVCC is set to `{}`, but no such file exists.\n\
                         Point NVCC at a CUDA 13.0 nvcc, or unset it to search \
                         CUDA_HOME, CUDA_PATH and PATH.\n",
                        nvcc.display()
                    );
                }
            }
            // cudaforge looks on PATH before CUDA_HOME; the toolkit the user
            // named comes first.
            None => {
                let named = ["CUDA_HOME", "CUDA_PATH"]
                    .into_iter()
                    .filter_map(env::var_os)
                    .map(PathBuf::from)
                    .find(|root| root.join("bin").join("nvcc").is_file());
                if let Some(root) = named {
                    builder = builder.cuda_root(root);
                }
            }
        }

        let ptx = builder.build_ptx().unwrap_or_else(|e| match e {
            Error::NvccNotFound(why) => panic!("{NO_NVCC}\n(cudaforge: {why})\n"),
            e => panic!("\n\n{e}\n"),
        });
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
        ptx.write(out.join("cuda_kernels.rs"))
            .unwrap_or_else(|e| panic!("cannot write cuda_kernels.rs: {e}"));
    }

    const NO_NVCC: &str = "\n
The `cuda` feature needs nvcc (the CUDA compiler) to build cuda-kernels/*.cu,
and none was found: NVCC is unset, neither $CUDA_HOME/bin/nvcc nor
$CUDA_PATH/bin/nvcc exists, and there is no nvcc on PATH or in the usual
install folders.

Get one of these ways (CUDA 13.0: PTX from a newer nvcc does not load on a
13.0 driver):
  * a system CUDA toolkit: set CUDA_HOME=/usr/local/cuda (or put its bin/ on PATH);
  * without a system install, from this repository's root:
      eval \"$(bash scripts/cuda-toolchain.sh)\"
    which installs pinned PyPI wheels into .cuda-toolchain/ and exports NVCC,
    CUDA_HOME, PATH, CUDA_COMPUTE_CAP, RUSTFLAGS and LD_LIBRARY_PATH.

Without a GPU, also set CUDA_COMPUTE_CAP (e.g. 90). Building without
`--features cuda` needs none of this.
";
}
