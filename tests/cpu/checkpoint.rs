//! Checkpoints in and out: PyTorch BatchNorm/SyncBatchNorm state dicts
//! (safetensors and `.pth`, with the i64 `num_batches_tracked`), candle-nn
//! checkpoints (without it), and saving for PyTorch. Every file is written by
//! the tests themselves; the `.pth` writer below produces torch.save's zip
//! layout (protocol-2 pickle + raw little-endian storages) without Python.

use crate::common;

use candle::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::convert::checkpoint::{
    check_pth, check_safetensors, load_checkpoint, read_state_dict, save_checkpoint,
    CheckpointFormat, LoadOptions,
};
use candle_syncbn::{error_kind, BatchNormRewriter, ErrorKind, ProcessGroup, SyncBatchNorm};
use common::{values, Rng};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const C: usize = 4;

/// A fresh directory for one test's files.
fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "candle-syncbn-checkpoint-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A PyTorch BatchNorm state dict under `prefix` (f32 stats, i64 scalar counter).
fn torch_bn_state(prefix: &str, seed: u64, nbt: i64) -> Vec<(String, Tensor)> {
    let mut rng = Rng::new(seed);
    let f32s = |v: Vec<f64>| common::tensor(&v, &[C], DType::F32);
    let var: Vec<f64> = rng
        .normals(C, 0.0, 0.4)
        .iter()
        .map(|v| v.abs() + 0.3)
        .collect();
    vec![
        (format!("{prefix}weight"), f32s(rng.normals(C, 1.0, 0.3))),
        (format!("{prefix}bias"), f32s(rng.normals(C, 0.0, 0.5))),
        (
            format!("{prefix}running_mean"),
            f32s(rng.normals(C, 0.5, 1.0)),
        ),
        (format!("{prefix}running_var"), f32s(var)),
        (
            format!("{prefix}num_batches_tracked"),
            Tensor::new(nbt, &Device::Cpu).unwrap(),
        ),
    ]
}

fn get<'a>(state: &'a [(String, Tensor)], suffix: &str) -> &'a Tensor {
    &state.iter().find(|(k, _)| k.ends_with(suffix)).unwrap().1
}

fn save_safetensors(state: &[(String, Tensor)], path: &Path) {
    let map: HashMap<String, Tensor> = state.iter().cloned().collect();
    candle::safetensors::save(&map, path).unwrap();
}

/// Eval output of BatchNorm with the state's statistics, in f64 (the textbook formula).
fn expected_eval(state: &[(String, Tensor)], x: &Tensor, eps: f64) -> Vec<f64> {
    let [w, b, m, v] =
        ["weight", "bias", "running_mean", "running_var"].map(|s| values(get(state, s)));
    let dims = x.dims().to_vec();
    let inner: usize = dims[2..].iter().product();
    values(x)
        .iter()
        .enumerate()
        .map(|(i, &xi)| {
            let c = (i / inner) % dims[1];
            (xi - m[c]) / (v[c] + eps).sqrt() * w[c] + b[c]
        })
        .collect()
}

fn assert_values(what: &str, got: &[f64], want: &[f64], atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol,
            "{what}[{i}]: got {g}, want {w} (atol {atol:e})"
        );
    }
}

/// The layer's statistics and eval output agree with the state dict.
fn check_layer_matches(layer: &SyncBatchNorm, state: &[(String, Tensor)], nbt: u64) {
    assert_values(
        "running_mean",
        &values(layer.running_mean().unwrap()),
        &values(get(state, "running_mean")),
        0.0,
    );
    assert_values(
        "running_var",
        &values(layer.running_var().unwrap()),
        &values(get(state, "running_var")),
        0.0,
    );
    let (w, b) = layer.weight_and_bias().unwrap();
    assert_values("weight", &values(w), &values(get(state, "weight")), 0.0);
    assert_values("bias", &values(b), &values(get(state, "bias")), 0.0);
    assert_eq!(layer.num_batches_tracked().unwrap(), nbt);
    let mut rng = Rng::new(99);
    let x = common::tensor(&rng.normals(2 * C * 6, 0.0, 2.0), &[2, C, 2, 3], DType::F32);
    let y = layer.forward_t(&x, false).unwrap();
    assert_values(
        "eval output",
        &values(&y),
        &expected_eval(state, &x, 1e-5),
        1e-5,
    );
}

// ---------------------------------------------------------------------------
// A minimal torch.save writer (zip of a protocol-2 pickle and raw storages).

/// A pickle being written, with torch.save's habit of storing every object
/// it builds in the memo (BINPUT), which candle's reader copies.
struct Pickle(Vec<u8>, u32);

impl Pickle {
    fn new() -> Self {
        Self(vec![0x80, 2], 0)
    }
    fn put(&mut self) {
        if self.1 < 256 {
            self.0.extend_from_slice(&[b'q', self.1 as u8]);
        } else {
            self.0.push(b'r');
            self.0.extend_from_slice(&self.1.to_le_bytes());
        }
        self.1 += 1;
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self.put();
    }
    fn unicode(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self.put();
    }
    fn int(&mut self, v: usize) {
        if v < 256 {
            self.0.extend_from_slice(&[b'K', v as u8]);
        } else {
            self.0.push(b'J');
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        }
    }
    fn int_tuple(&mut self, vs: &[usize]) {
        self.0.push(b'(');
        vs.iter().for_each(|&v| self.int(v));
        self.0.push(b't');
        self.put();
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R");
        self.put();
    }
    /// `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`.
    fn tensor(&mut self, storage_class: &str, key: &str, dims: &[usize]) {
        // Wrapping: the hostile-file tests declare shapes that overflow.
        let mut strides = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1].wrapping_mul(dims[i + 1]);
        }
        self.strided_tensor(storage_class, key, dims, &strides);
    }
    fn strided_tensor(
        &mut self,
        storage_class: &str,
        key: &str,
        dims: &[usize],
        strides: &[usize],
    ) {
        self.offset_tensor(storage_class, key, 0, dims, strides);
    }
    /// `_rebuild_tensor_v2` with a storage offset (in elements), written as
    /// torch.save does: BININT1/BININT when it fits, LONG1 otherwise.
    fn offset_tensor(
        &mut self,
        storage_class: &str,
        key: &str,
        offset: u64,
        dims: &[usize],
        strides: &[usize],
    ) {
        let numel = dims.iter().fold(1usize, |n, &d| n.wrapping_mul(d));
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.0.push(b'(');
        self.0.push(b'(');
        self.unicode("storage");
        self.global("torch", storage_class);
        self.unicode(key);
        self.unicode("cpu");
        self.int(numel);
        self.0.push(b't');
        self.put();
        self.0.push(b'Q');
        if offset <= i32::MAX as u64 {
            self.int(offset as usize);
        } else {
            self.0.extend_from_slice(&[0x8a, 8]);
            self.0.extend_from_slice(&offset.to_le_bytes());
        }
        self.int_tuple(dims);
        self.int_tuple(strides);
        self.0.push(0x89);
        self.ordered_dict();
        self.0.push(b't');
        self.put();
        self.0.push(b'R');
        self.put();
    }
}

/// Writes `state` as torch.save would: `{name: tensor}` (an OrderedDict), or
/// `{wrap_key: OrderedDict, "epoch": 3}` when `wrap_key` is given.
fn write_pth(path: &Path, state: &[(String, Tensor)], wrap_key: Option<&str>) {
    let mut p = Pickle::new();
    if let Some(k) = wrap_key {
        p.0.extend_from_slice(b"}(");
        p.unicode(k);
    }
    p.ordered_dict();
    p.0.push(b'(');
    let mut storages = Vec::new();
    for (i, (name, t)) in state.iter().enumerate() {
        let (class, bytes): (&str, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                "FloatStorage",
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::I64 => (
                "LongStorage",
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            d => panic!("test writer: unsupported dtype {d:?}"),
        };
        p.unicode(name);
        p.tensor(class, &i.to_string(), t.dims());
        storages.push((i.to_string(), bytes));
    }
    p.0.push(b'u');
    if wrap_key.is_some() {
        p.unicode("epoch");
        p.int(3);
        p.0.push(b'u');
    }
    p.0.push(b'.');
    let storages: Vec<(String, &[u8])> = storages
        .iter()
        .map(|(key, bytes)| (format!("data/{key}"), &bytes[..]))
        .collect();
    write_pth_archive(path, &p.0, &storages);
}

/// Writes a torch.save zip: `archive/data.pkl` = `pickle`, the other entries
/// under `archive/`.
fn write_pth_archive(path: &Path, pickle: &[u8], entries: &[(String, &[u8])]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut add = |name: &str, data: &[u8]| {
        zip.start_file(format!("archive/{name}"), opts).unwrap();
        zip.write_all(data).unwrap();
    };
    add("data.pkl", pickle);
    add("byteorder", b"little");
    for (name, bytes) in entries {
        add(name, bytes);
    }
    add("version", b"3\n");
    zip.finish().unwrap();
}

// ---------------------------------------------------------------------------

/// A PyTorch state dict in safetensors loads into a VarMap model (counter
/// included), trains, and saves back with PyTorch's names and dtypes.
#[test]
fn pytorch_safetensors_round_trip() {
    let dir = test_dir("st");
    let state = torch_bn_state("features.bn.", 1, 7);
    let src = dir.join("torch.safetensors");
    save_safetensors(&state, &src);
    assert_eq!(
        CheckpointFormat::detect(&src).unwrap(),
        CheckpointFormat::Safetensors
    );

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = candle_syncbn::batch_norm(C, 1e-5, vb.pp("features").pp("bn")).unwrap();
    let report = load_checkpoint(&varmap, &src, &LoadOptions::default()).unwrap();
    assert_eq!(report.loaded.len(), 5);
    assert!(report.counters_defaulted.is_empty() && report.missing.is_empty());
    assert!(report.unexpected.is_empty());
    check_layer_matches(&bn, &state, 7);

    // One training step: the statistics move and the counter counts.
    let mut rng = Rng::new(5);
    let x = common::tensor(&rng.normals(3 * C * 5, 1.0, 1.0), &[3, C, 5], DType::F32);
    bn.forward_t(&x, true).unwrap();
    assert_eq!(bn.num_batches_tracked().unwrap(), 8);

    let out = dir.join("saved.safetensors");
    save_checkpoint(&varmap, &out).unwrap();
    let saved = candle::safetensors::load(&out, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "features.bn.bias",
            "features.bn.num_batches_tracked",
            "features.bn.running_mean",
            "features.bn.running_var",
            "features.bn.weight"
        ]
    );
    let nbt = &saved["features.bn.num_batches_tracked"];
    assert_eq!((nbt.dtype(), nbt.dims()), (DType::I64, &[][..]));
    assert_eq!(nbt.to_scalar::<i64>().unwrap(), 8);
    for name in ["weight", "bias", "running_mean", "running_var"] {
        let t = &saved[&format!("features.bn.{name}")];
        assert_eq!((t.dtype(), t.dims()), (DType::F32, &[C][..]), "{name}");
    }
    assert_values(
        "saved running_mean",
        &values(&saved["features.bn.running_mean"]),
        &values(bn.running_mean().unwrap()),
        0.0,
    );
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );

    // The saved file loads into a fresh model with the same values.
    let varmap2 = VarMap::new();
    let vb2 = VarBuilder::from_varmap(&varmap2, DType::F32, &Device::Cpu);
    let bn2 = candle_syncbn::batch_norm(C, 1e-5, vb2.pp("features.bn")).unwrap();
    load_checkpoint(&varmap2, &out, &LoadOptions::default()).unwrap();
    let saved_vec: Vec<(String, Tensor)> = saved.into_iter().collect();
    check_layer_matches(&bn2, &saved_vec, 8);
    std::fs::remove_dir_all(&dir).ok();
}

/// The same file read through a VarBuilder (no VarMap), for the drop-in
/// constructor and for a site the rewriter keeps local.
#[test]
fn pytorch_safetensors_through_varbuilder() {
    let dir = test_dir("vb");
    let mut state = torch_bn_state("bn.", 2, 41);
    state.extend(torch_bn_state("head.bn.", 3, 41));
    let src = dir.join("torch.safetensors");
    save_safetensors(&state, &src);
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[&src], DType::F32, &Device::Cpu) }.unwrap();
    let bn = SyncBatchNorm::new(C, 1e-5, vb.pp("bn"), ProcessGroup::single()).unwrap();
    check_layer_matches(&bn, &state[..5], 41);
    let rw = BatchNormRewriter::new(vb.clone(), ProcessGroup::single())
        .filter(|p| !p.starts_with("head"));
    let head = rw.batch_norm(C, 1e-5, vb.pp("head").pp("bn")).unwrap();
    assert!(!head.is_sync());
    assert_eq!(head.num_batches_tracked().unwrap(), 41);
    assert_values(
        "local running_var",
        &values(head.running_var().unwrap()),
        &values(get(&state[5..], "running_var")),
        0.0,
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `.pth` state dicts (torch.save's zip format) load through candle's pickle
/// reader, via `VarBuilder::from_pth` and into a VarMap, including the i64
/// counter, a nested state dict and DDP's `module.` prefix.
#[test]
fn pth_state_dicts_load() {
    let dir = test_dir("pth");
    let state = torch_bn_state("bn.", 3, 12);
    let plain = dir.join("plain.pth");
    write_pth(&plain, &state, None);
    assert_eq!(
        CheckpointFormat::detect(&plain).unwrap(),
        CheckpointFormat::Pth
    );

    let vb = VarBuilder::from_pth(&plain, DType::F32, &Device::Cpu).unwrap();
    let bn = candle_syncbn::batch_norm(C, 1e-5, vb.pp("bn")).unwrap();
    check_layer_matches(&bn, &state, 12);

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = candle_syncbn::batch_norm(C, 1e-5, vb.pp("bn")).unwrap();
    let report = load_checkpoint(&varmap, &plain, &LoadOptions::default()).unwrap();
    assert_eq!(report.loaded.len(), 5);
    check_layer_matches(&bn, &state, 12);

    // {"state_dict": {"module.bn.weight": …}, "epoch": 3}
    let ddp: Vec<(String, Tensor)> = torch_bn_state("module.bn.", 4, 30);
    let nested = dir.join("nested.pth");
    write_pth(&nested, &ddp, Some("state_dict"));
    let err = load_checkpoint(&varmap, &nested, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pth_key"), "{err}");
    let options = LoadOptions::default()
        .with_pth_key("state_dict")
        .with_strip_prefix("module.");
    let sd = read_state_dict(&nested, &options).unwrap();
    assert!(sd.contains_key("bn.num_batches_tracked"));
    load_checkpoint(&varmap, &nested, &options).unwrap();
    let unprefixed: Vec<(String, Tensor)> = ddp
        .iter()
        .map(|(k, t)| (k.trim_start_matches("module.").to_string(), t.clone()))
        .collect();
    check_layer_matches(&bn, &unprefixed, 30);
    std::fs::remove_dir_all(&dir).ok();
}

/// A candle-nn checkpoint (no `num_batches_tracked`) loads into a synchronized
/// model with the counter at 0; the other way, the extra counter is ignored.
#[test]
fn candle_nn_checkpoints_both_ways() {
    let dir = test_dir("nn");
    let state = torch_bn_state("block.bn.", 6, 0);
    let mut nn_map = VarMap::new();
    let nn_vb = VarBuilder::from_varmap(&nn_map, DType::F32, &Device::Cpu);
    let nn = candle_nn::batch_norm(C, 1e-5, nn_vb.pp("block.bn")).unwrap();
    nn_map.set(state[..4].iter().map(|(k, t)| (k, t))).unwrap();
    let nn_file = dir.join("candle_nn.safetensors");
    nn_map.save(&nn_file).unwrap();

    let mut sync_map = VarMap::new();
    let sync_vb = VarBuilder::from_varmap(&sync_map, DType::F32, &Device::Cpu);
    let bn = candle_syncbn::batch_norm(C, 1e-5, sync_vb.pp("block.bn")).unwrap();
    // candle's VarMap::load requires every variable in the file…
    assert!(sync_map.load(&nn_file).is_err());
    // …load_checkpoint starts a missing counter at 0.
    let report = load_checkpoint(&sync_map, &nn_file, &LoadOptions::default()).unwrap();
    assert_eq!(report.counters_defaulted, ["block.bn.num_batches_tracked"]);
    assert_eq!(report.loaded.len(), 4);
    check_layer_matches(&bn, &state, 0);

    // Through a VarBuilder over the file, too.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&nn_file], DType::F32, &Device::Cpu) }
        .unwrap();
    let bn_vb = SyncBatchNorm::new(C, 1e-5, vb.pp("block.bn"), ProcessGroup::single()).unwrap();
    check_layer_matches(&bn_vb, &state, 0);

    // Synchronized checkpoint → plain candle-nn model: the counter is unexpected but fine.
    let x = common::tensor(&Rng::new(8).normals(4 * C, 0.0, 1.0), &[4, C], DType::F32);
    bn.forward_t(&x, true).unwrap();
    let sync_file = dir.join("sync.safetensors");
    save_checkpoint(&sync_map, &sync_file).unwrap();
    let report = load_checkpoint(&nn_map, &sync_file, &LoadOptions::default()).unwrap();
    assert_eq!(report.unexpected, ["block.bn.num_batches_tracked"]);
    assert_values(
        "candle-nn running_mean after loading",
        &values(nn.running_mean()),
        &values(bn.running_mean().unwrap()),
        0.0,
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Bad checkpoints give errors that name the variable with expected and
/// actual shape or dtype, and leave every variable unchanged.
#[test]
fn load_errors_are_clear_and_change_nothing() {
    let dir = test_dir("err");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = candle_syncbn::batch_norm(C, 1e-5, vb.pp("bn")).unwrap();

    // Wrong shape of one statistic: nothing is loaded, not even the good weight.
    let mut state = torch_bn_state("bn.", 7, 3);
    state[2].1 = Tensor::zeros(C + 1, DType::F32, &Device::Cpu).unwrap();
    let file = dir.join("bad_shape.safetensors");
    save_safetensors(&state, &file);
    let err = load_checkpoint(&varmap, &file, &LoadOptions::default()).unwrap_err();
    assert_eq!(error_kind(&err), Some(ErrorKind::BadCheckpoint), "{err}");
    let err = err.to_string();
    assert!(
        err.contains("bn.running_mean") && err.contains("[4]") && err.contains("[5]"),
        "{err}"
    );
    assert!(err.contains("bad_shape.safetensors"), "{err}");
    assert_values(
        "weight unchanged",
        &values(bn.weight_and_bias().unwrap().0),
        &[1.0; C],
        0.0,
    );
    assert_eq!(bn.num_batches_tracked().unwrap(), 0);

    // Integer weight.
    let mut state = torch_bn_state("bn.", 7, 3);
    state[0].1 = Tensor::new(&[1i64, 2, 3, 4], &Device::Cpu).unwrap();
    save_safetensors(&state, &file);
    let err = load_checkpoint(&varmap, &file, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bn.weight") && err.contains("F32") && err.contains("I64"),
        "{err}"
    );

    // Missing and unexpected keys: strict fails, non-strict reports.
    let mut state = torch_bn_state("bn.", 7, 3);
    state.remove(1);
    state.push((
        "fc.weight".into(),
        Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
    ));
    save_safetensors(&state, &file);
    let err = load_checkpoint(&varmap, &file, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing") && err.contains("bn.bias"), "{err}");
    assert!(
        err.contains("unexpected") && err.contains("fc.weight"),
        "{err}"
    );
    let lenient = LoadOptions::default().with_strict(false);
    let report = load_checkpoint(&varmap, &file, &lenient).unwrap();
    assert_eq!(report.missing, ["bn.bias"]);
    assert_eq!(report.unexpected, ["fc.weight"]);
    assert_eq!(bn.num_batches_tracked().unwrap(), 3);

    // f64 tensors in the file are converted to the variables' f32.
    let state64: Vec<(String, Tensor)> = torch_bn_state("bn.", 8, 5)
        .into_iter()
        .map(|(k, t)| {
            let t = if t.dtype() == DType::F32 {
                t.to_dtype(DType::F64).unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    save_safetensors(&state64, &file);
    load_checkpoint(&varmap, &file, &LoadOptions::default()).unwrap();
    check_layer_matches(&bn, &torch_bn_state("bn.", 8, 5), 5);

    // Not a checkpoint, a truncated one, no file: errors, no panics.
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"hello, not a checkpoint").unwrap();
    let err = load_checkpoint(&varmap, &junk, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected a safetensors file"), "{err}");
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    assert!(load_checkpoint(&varmap, &cut, &LoadOptions::default()).is_err());
    let cut_pth = dir.join("cut.pth");
    write_pth(&cut_pth, &torch_bn_state("bn.", 1, 1), None);
    let bytes = std::fs::read(&cut_pth).unwrap();
    std::fs::write(&cut_pth, &bytes[..bytes.len() / 2]).unwrap();
    assert!(load_checkpoint(&varmap, &cut_pth, &LoadOptions::default()).is_err());
    assert!(load_checkpoint(&varmap, dir.join("absent.pth"), &LoadOptions::default()).is_err());
    check_layer_matches(&bn, &torch_bn_state("bn.", 8, 5), 5);
    std::fs::remove_dir_all(&dir).ok();
}

/// Optional: PyTorch itself loads a saved checkpoint into `nn.BatchNorm2d`
/// (strict) and computes the same eval output. Skipped when Python or torch is
/// absent (CI stays light).
#[test]
fn pytorch_loads_saved_checkpoint() {
    let has_torch = std::process::Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_torch {
        common::report_skip(
            "skipped pytorch_loads_saved_checkpoint: python3 with torch is not available",
        );
        return;
    }
    let dir = test_dir("torch");
    let state = torch_bn_state("bn.", 9, 17);
    let src = dir.join("in.safetensors");
    save_safetensors(&state, &src);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = candle_syncbn::batch_norm(C, 1e-5, vb.pp("bn")).unwrap();
    load_checkpoint(&varmap, &src, &LoadOptions::default()).unwrap();
    let mut rng = Rng::new(10);
    let x = common::tensor(&rng.normals(2 * C * 9, 0.0, 1.0), &[2, C, 3, 3], DType::F32);
    bn.forward_t(&x, true).unwrap();
    let y = bn.forward_t(&x, false).unwrap();
    let ckpt = dir.join("out.safetensors");
    save_checkpoint(&varmap, &ckpt).unwrap();
    let io = dir.join("io.safetensors");
    save_safetensors(&[("x".into(), x), ("y".into(), y)], &io);
    let script = format!(
        r#"
import json, struct, torch
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
    dt = {{"F32": torch.float32, "I64": torch.int64}}
    out = {{}}
    for k, v in h.items():
        if k == "__metadata__": continue
        s, e = v["data_offsets"]
        out[k] = torch.frombuffer(bytearray(b[8 + n + s:8 + n + e]), dtype=dt[v["dtype"]]).reshape(v["shape"])
    return out
sd = load({ckpt:?}); io = load({io:?})
bn = torch.nn.BatchNorm2d({C})
bn.load_state_dict({{k[3:]: v for k, v in sd.items()}}, strict=True)
assert bn.num_batches_tracked.item() == 18, bn.num_batches_tracked
bn.eval()
d = (bn(io["x"]) - io["y"]).abs().max().item()
print("max abs diff", d)
assert d < 1e-5
"#
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------
// Hostile .pth files (issue 23, items 4 and 6): what candle's pickle reader
// must never see, refused with an error that names the file, the entry and
// the byte offset.

/// `f` in a spawned thread with the default 2 MiB stack, as a loader in a
/// worker thread has it (the main thread's 8 MiB would hide overflows).
fn in_2mib_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

/// The error of loading `path` into a one-layer model (in a 2 MiB thread).
fn load_error(path: &Path) -> String {
    let path = path.to_path_buf();
    in_2mib_thread(move || {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        candle_syncbn::batch_norm(C, 1e-5, vb.pp("bn")).unwrap();
        let e = load_checkpoint(&varmap, &path, &LoadOptions::default()).unwrap_err();
        // Typed, so that a loop can tell a bad file from other failures.
        assert_eq!(error_kind(&e), Some(ErrorKind::BadCheckpoint), "{e}");
        e.to_string()
    })
}

fn pickle_of(parts: &[&[u8]]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    parts.iter().for_each(|x| p.extend_from_slice(x));
    p.push(b'.');
    p
}

/// 200 000 nested tuples (400 KB) and 50 000 nested lists (100 KB) used to
/// overflow the stack of candle's recursive code and abort the process; now
/// they are refused at the 257th level, in a thread with a 2 MiB stack.
#[test]
fn deeply_nested_pickles_are_refused() {
    let dir = test_dir("deep");
    let tuples = dir.join("tuples.pth");
    let (marks, closes) = (vec![b'('; 200_000], vec![b't'; 200_000]);
    write_pth_archive(&tuples, &pickle_of(&[&marks, &closes]), &[]);
    let lists = dir.join("lists.pth");
    let (empty, appends) = (vec![b']'; 50_001], vec![b'a'; 50_000]);
    write_pth_archive(&lists, &pickle_of(&[&empty, &appends]), &[]);
    // The 257th TUPLE / APPEND is refused: 2 bytes of PROTO, the opening run,
    // 256 (tuples) or 255 (lists) closings before it.
    for (file, offset) in [(&tuples, 2 + 200_000 + 256), (&lists, 2 + 50_001 + 255)] {
        let err = load_error(file);
        let want =
            format!("archive/data.pkl at byte {offset}: objects nested more than 256 levels");
        assert!(err.contains(&want) && err.contains("depth limit"), "{err}");
        assert!(err.contains(&format!("{file:?}")), "{err}");
        let err = check_pth(file, None).unwrap_err().to_string();
        assert!(err.contains(&want), "{err}");
    }

    // 250 levels pass the scan and reach candle, whose error path prints the
    // whole object with `{:?}` (recursively): no overflow in 2 MiB either.
    let deep = dir.join("deep_ok.pth");
    let (empty, appends) = (vec![b']'; 250], vec![b'a'; 249]);
    let mut p = Pickle::new();
    p.0.push(b'}');
    p.unicode("bn.weight");
    p.global("torch._utils", "_rebuild_tensor_v2");
    p.0.extend_from_slice(&empty);
    p.0.extend_from_slice(&appends);
    p.0.extend_from_slice(b"Rs.");
    write_pth_archive(&deep, &p.0, &[]);
    let err = load_error(&deep);
    assert!(err.contains("found no tensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A 5 MB pickle of EMPTY_LIST/NONE opcodes made candle build 5 million
/// 48-byte objects (the 50 MB one of the issue took 2.46 GB); a 100-byte
/// pickle that memoizes a tuple and builds tuples of two copies of it, 18
/// times, made it copy 2^19 objects (22 times here: 2^23 objects, 1 GB).
/// Both are refused by the memory limit: 48 times the file's size, at least
/// 192 MiB, for all pickles of the file together.
#[test]
fn pickle_floods_are_refused() {
    let dir = test_dir("flood");
    let flood = dir.join("flood.pth");
    let body: Vec<u8> = b"]N".repeat(2_500_000);
    write_pth_archive(&flood, &pickle_of(&[&body]), &[]);
    let file_len = std::fs::metadata(&flood).unwrap().len();
    let err = load_error(&flood);
    assert!(
        err.contains("archive/data.pkl at byte ")
            && err.contains(&format!(
                "memory limit of this file, {} bytes",
                file_len * 48
            )),
        "{err}"
    );

    let laughs = dir.join("laughs.pth");
    let mut p = vec![b'N', b'N', 0x86, b'q', 0];
    for level in 1..=22u8 {
        p.extend_from_slice(&[b'h', level - 1, b'h', level - 1, 0x86, b'q', level]);
    }
    write_pth_archive(&laughs, &pickle_of(&[&p]), &[]);
    let err = load_error(&laughs);
    assert!(
        err.contains("memory limit of this file, 201326592 bytes"),
        "{err}"
    );

    // Several pickles share one budget: a zip may hold (or name) many.
    let many = dir.join("many.pth");
    let part = pickle_of(&[&b"]N".repeat(300_000)]);
    let others = ["b", "c"].map(|d| (format!("{d}/data.pkl"), &part[..]));
    write_pth_archive(&many, &part, &others);
    let err = load_error(&many);
    assert!(
        err.contains("archive/b/data.pkl at byte ")
            && err.contains("memory limit of this file, 201326592 bytes"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A pickle's tensor entries are checked before any tensor is allocated:
/// shapes beyond their storage (candle allocated the declared size, 16 TiB
/// here, and aborted), shapes whose size overflows, tuples too short for
/// candle's `rebuild_args` (it panicked), storages the archive lacks, and
/// tensors that in all take more than 4 times the file.
#[test]
fn hostile_tensor_entries_are_errors() {
    let dir = test_dir("tensor");
    let file = dir.join("t.pth");
    let storage = [0u8; 16];
    let write = |dims: &[usize], storage_key: &str, short_args: bool| {
        let mut p = Pickle::new();
        p.ordered_dict();
        p.unicode("bn.weight");
        if short_args {
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.0.extend_from_slice(b"(K\x00K\x00tR");
        } else {
            p.tensor("FloatStorage", storage_key, dims);
        }
        p.0.extend_from_slice(b"s.");
        write_pth_archive(&file, &p.0, &[("data/0".to_string(), &storage[..])]);
    };
    // The largest dimension a pickle's BININT holds.
    const M: usize = i32::MAX as usize;
    let cases: [(&[usize], &str, bool, &str); 4] = [
        (
            &[M, 2048],
            "0",
            false,
            "tensor 'bn.weight': expected its 17592186036224 bytes from byte 0 of its storage \
             archive/data/0, which holds 16 bytes",
        ),
        (
            &[M, M, M],
            "0",
            false,
            "tensor 'bn.weight': shape [2147483647, 2147483647, 2147483647] overflows",
        ),
        (
            &[4],
            "7",
            false,
            "tensor 'bn.weight': its storage archive/data/7",
        ),
        (
            &[4],
            "0",
            true,
            "tensor 'bn.weight': _rebuild_tensor_v2 has 2 arguments, expected at least 4",
        ),
    ];
    for (dims, key, short, want) in cases {
        write(dims, key, short);
        let err = load_error(&file);
        assert!(
            err.contains(want) && err.contains("t.pth"),
            "{dims:?}: {err}"
        );
    }
    // The same file with a fitting shape loads.
    write(&[4], "0", false);
    let sd = read_state_dict(&file, &LoadOptions::default()).unwrap();
    assert_eq!(values(&sd["bn.weight"]), [0.0; 4]);

    // Tensors sharing one storage are read once each: 8 views of a 64 KiB
    // storage take more than 4 times the file.
    let mut p = Pickle::new();
    p.ordered_dict();
    p.0.push(b'(');
    for i in 0..8 {
        p.unicode(&format!("w{i}"));
        p.tensor("FloatStorage", "0", &[16 << 10]);
    }
    p.0.extend_from_slice(b"u.");
    let big = vec![0u8; 64 << 10];
    write_pth_archive(&file, &p.0, &[("data/0".to_string(), &big[..])]);
    let len = std::fs::metadata(&file).unwrap().len();
    let err = load_error(&file);
    assert!(
        err.contains(&format!(
            "its tensors take 524288 bytes, more than 4 times the file's {len} bytes"
        )),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A Fortran-ordered tensor (as numpy's transposes save) loads with its
/// values where candle's own reader puts them; other strides are an error.
#[test]
fn strided_pth_tensors() {
    let dir = test_dir("strided");
    let file = dir.join("f.pth");
    let storage: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
    let write = |strides: &[usize]| {
        let mut p = Pickle::new();
        p.ordered_dict();
        p.unicode("w");
        p.strided_tensor("FloatStorage", "0", &[2, 3], strides);
        p.0.extend_from_slice(b"s.");
        write_pth_archive(&file, &p.0, &[("data/0".to_string(), &storage[..])]);
    };
    write(&[1, 2]);
    let sd = read_state_dict(&file, &LoadOptions::default()).unwrap();
    // Element (i, j) is storage[i + 2 j].
    assert_eq!(
        sd["w"].to_vec2::<f32>().unwrap(),
        [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    );
    write(&[1, 1]);
    let err = read_state_dict(&file, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "tensor 'w': expected a contiguous layout, got shape [2, 3] with strides [1, 1]"
        ),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The densest real case stays within the limits: a torch.save state dict
/// of 12 000 i64 scalars (every object memoized, as torch.save does) needs
/// more than the 2^20-object floor, and loads.
#[test]
fn large_state_dict_of_scalars_loads() {
    let dir = test_dir("scalars");
    let file = dir.join("scalars.pth");
    let state: Vec<(String, Tensor)> = (0..12_000i64)
        .map(|i| {
            (
                format!("layer{i}.bn.num_batches_tracked"),
                Tensor::new(i, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    write_pth(&file, &state, None);
    check_pth(&file, None).unwrap();
    let sd = read_state_dict(&file, &LoadOptions::default()).unwrap();
    assert_eq!(sd.len(), 12_000);
    assert_eq!(
        sd["layer11999.bn.num_batches_tracked"]
            .to_scalar::<i64>()
            .unwrap(),
        11_999
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Hostile safetensors headers are errors without an allocation of the size
/// they declare: the `safetensors` crate bounds the header (100 MB, within
/// the file) and checks every tensor's shape against its offsets and the
/// data. (A regression test: this held before the pickle guard.)
#[test]
fn hostile_safetensors_headers_are_errors() {
    let dir = test_dir("st-hostile");
    let file = dir.join("h.safetensors");
    let with_header = |declared: u64, header: &str, data: usize| {
        let mut b = declared.to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(&file, b).unwrap();
    };
    let exact = |header: &str, data: usize| with_header(header.len() as u64, header, data);
    let cases: [(&dyn Fn(), &str); 4] = [
        (&|| with_header(u64::MAX, "{}", 0), "header too large"),
        (&|| with_header(1 << 40, "{}", 0), "header too large"),
        (
            &|| {
                exact(
                    r#"{"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}"#,
                    16,
                )
            },
            "overflow computing buffer size",
        ),
        (
            &|| {
                exact(
                    r#"{"w":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4398046511104]}}"#,
                    16,
                )
            },
            "incomplete metadata, file not fully covered",
        ),
    ];
    for (write, want) in cases {
        write();
        let err = load_error(&file);
        assert!(err.contains(want) && err.contains("h.safetensors"), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The child mode of the capped-load tests: loads the file `CAPPED_LOAD_ENV`
/// names into a one-layer model and prints the outcome and the peak RSS.
#[cfg(target_os = "linux")]
const CAPPED_LOAD_ENV: &str = "CANDLE_SYNCBN_TEST_CAPPED_LOAD";

/// The address space (RLIMIT_AS) of a child that loads a hostile file: ample
/// for a refusal, far less than the machine, so a loader that allocates out
/// of proportion to the file fails the test instead of taking the machine.
#[cfg(target_os = "linux")]
const CAPPED_LOAD_AS: u64 = 2 << 30;

/// In the child: loads `file` and prints `LOAD: Ok(n)` or `LOAD: Err(…)`,
/// then the process's peak RSS (`VmHWM`).
#[cfg(target_os = "linux")]
fn capped_child_load(file: &std::ffi::OsStr) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    candle_syncbn::batch_norm(C, 1e-5, vb.pp("bn")).unwrap();
    let started = std::time::Instant::now();
    match read_state_dict(Path::new(file), &LoadOptions::default()) {
        Ok(sd) => println!("LOAD: Ok({})", sd.len()),
        Err(e) => println!("LOAD: Err({e})"),
    }
    println!("LOAD TIME: {:?}", started.elapsed());
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(hwm) = status.lines().find(|l| l.starts_with("VmHWM")) {
        println!("{hwm}");
    }
}

/// Runs test `test` of this module again as a child that loads `file` with
/// its address space capped at [`CAPPED_LOAD_AS`]; returns its stdout, or
/// panics if it did not exit normally (an abort or a kill is a failure).
#[cfg(target_os = "linux")]
fn load_in_capped_child(test: &str, file: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.arg(common::test_path(module_path!(), test))
        .args(["--exact", "--test-threads=1", "--nocapture"])
        .env(CAPPED_LOAD_ENV, file);
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            let cap = libc::rlimit {
                rlim_cur: CAPPED_LOAD_AS,
                rlim_max: CAPPED_LOAD_AS,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &cap) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("LOAD: "),
        "the capped child loading {file:?} failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The byte offset in a pickle error `… at byte N: …`.
#[cfg(target_os = "linux")]
fn error_offset(err: &str) -> usize {
    let rest = err
        .split(" at byte ")
        .nth(1)
        .unwrap_or_else(|| panic!("{err}"));
    rest.split(':').next().unwrap().parse().unwrap()
}

/// One GLOBAL with a 1 MiB module name, memoized (BINPUT 0) and fetched
/// 200 000 times (BINGET 0) into a list: a 1.4 MB file. candle's reader
/// clones the whole name on every BINGET (200 GB; the process aborted or was
/// killed), while the scan counted a GLOBAL as one object and let it pass.
/// Now each copy counts the bytes candle copies, and the file is refused at
/// the BINGET that passes the file's memory limit, here 192 MiB (about the
/// 190th), first in a child whose address space is capped at 2 GiB (Linux
/// only: RLIMIT_AS).
#[cfg(target_os = "linux")]
#[test]
fn memo_copies_of_long_names_are_refused() {
    if let Some(file) = std::env::var_os(CAPPED_LOAD_ENV) {
        return capped_child_load(&file);
    }
    let dir = test_dir("memo-names");
    let file = dir.join("names.pth");
    let mut p = vec![0x80, 2, b'c'];
    p.extend(std::iter::repeat_n(b'a', 1 << 20));
    p.extend_from_slice(b"\nb\nq\x00](");
    let first_get = p.len();
    p.extend(std::iter::repeat_n([b'h', 0], 200_000).flatten());
    p.extend_from_slice(b"e.");
    write_pth_archive(&file, &p, &[]);
    // First in a capped child: a regression must not take the machine.
    let out = load_in_capped_child("memo_copies_of_long_names_are_refused", &file);
    let err = check_pth(&file, None).unwrap_err().to_string();
    assert!(out.contains(&format!("LOAD: Err({err})")), "{out}");
    let at = error_offset(&err);
    assert!(
        err.contains("names.pth")
            && err.contains("archive/data.pkl at byte ")
            && err.contains("memory limit of this file, 201326592 bytes"),
        "{err}"
    );
    // A BINGET, among the first 256: each copies more than 1 MiB.
    assert!(
        at >= first_get && at < first_get + 2 * 256 && (at - first_get).is_multiple_of(2),
        "{err}"
    );
    assert_eq!(load_error(&file), err);
    std::fs::remove_dir_all(&dir).ok();
}

/// A storage offset of 2^62 + 1 elements over a 5-float storage: candle's
/// reader computes the byte offset as offset × 4, which wraps to 4 (a
/// release build loaded elements 1..4 silently; a debug build panicked inside
/// candle). A negative offset (-1 as LONG1) is cast to usize::MAX. Both are
/// errors naming the tensor; an offset within the storage still loads.
#[test]
fn storage_offsets_that_wrap_are_errors() {
    let dir = test_dir("offset");
    let file = dir.join("o.pth");
    let storage: Vec<u8> = (0..5).flat_map(|v| (v as f32).to_le_bytes()).collect();
    let write = |offset: u64| {
        let mut p = Pickle::new();
        p.ordered_dict();
        p.unicode("w");
        p.offset_tensor("FloatStorage", "0", offset, &[4], &[1]);
        p.0.extend_from_slice(b"s.");
        write_pth_archive(&file, &p.0, &[("data/0".to_string(), &storage[..])]);
    };
    write((1 << 62) + 1);
    let err = load_error(&file);
    assert!(
        err.contains("o.pth")
            && err.contains("tensor 'w': storage offset 4611686018427387905 ")
            && err.contains("overflows"),
        "{err}"
    );
    assert_eq!(check_pth(&file, None).unwrap_err().to_string(), err);
    write(u64::MAX);
    let err = load_error(&file);
    assert!(err.contains("tensor 'w': storage offset -1 "), "{err}");
    write(2);
    let err = load_error(&file);
    assert!(
        err.contains(
            "tensor 'w': expected its 16 bytes from byte 8 of its storage archive/data/0, \
             which holds 20 bytes"
        ),
        "{err}"
    );
    write(1);
    let sd = read_state_dict(&file, &LoadOptions::default()).unwrap();
    assert_eq!(values(&sd["w"]), [1.0, 2.0, 3.0, 4.0]);
    std::fs::remove_dir_all(&dir).ok();
}

/// A safetensors file whose header lists `n` zero-size tensors.
fn zero_size_tensors(path: &Path, n: usize) {
    let mut header = String::from("{");
    for i in 0..n {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#
        ));
    }
    header.push('}');
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    std::fs::write(path, b).unwrap();
}

/// A safetensors header listing 845 000 zero-size tensors (a 52 MB file)
/// took 710 MB and 13 s to read. The entries of a header are counted before
/// it is parsed, and more than 65 536, or one per 64 bytes of tensor data if
/// that is more, are refused (here 65 537 entries, a 4 MB file).
#[test]
fn safetensors_tensor_counts_are_bounded() {
    let dir = test_dir("st-count");
    let file = dir.join("many.safetensors");
    zero_size_tensors(&file, 65_537);
    let err = load_error(&file);
    assert!(
        err.contains("many.safetensors")
            && err.contains("header lists more than 65536 entries, the limit of this file"),
        "{err}"
    );
    assert_eq!(check_safetensors(&file).unwrap_err().to_string(), err);
    zero_size_tensors(&file, 1000);
    check_safetensors(&file).unwrap();
    let sd = read_state_dict(&file, &LoadOptions::default()).unwrap();
    assert_eq!(sd.len(), 1000);
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------
// Saves: a fresh, randomly named temporary file per save, renamed over the
// target (issue 23, item 9; issue 29, item 4).

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A model of one BatchNorm layer whose statistics are all `v`.
fn bn_varmap(v: f32) -> VarMap {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    candle_syncbn::batch_norm(C, 1e-5, vb.pp("bn")).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if !name.ends_with("num_batches_tracked") {
            var.set(&Tensor::full(v, C, &Device::Cpu).unwrap()).unwrap();
        }
    }
    varmap
}

fn assert_checkpoint_holds(path: &Path, v: f32) {
    let saved = candle::safetensors::load(path, &Device::Cpu).unwrap();
    assert_eq!(saved.len(), 5, "{:?}", saved.keys());
    assert_values(
        "saved running_var",
        &values(&saved["bn.running_var"]),
        &[v as f64; C],
        0.0,
    );
}

/// Saves `v` to `path` with `save_checkpoint` (`i == 0`) or
/// `save_varmap_atomic`.
#[cfg(unix)]
fn save_either(i: usize, v: f32, path: &Path) -> candle::Result<()> {
    if i == 0 {
        save_checkpoint(&bn_varmap(v), path)
    } else {
        candle_syncbn::data_parallel::save_varmap_atomic(&bn_varmap(v), path)
    }
}

/// Concurrent saves to one path all succeed and end with one of them whole
/// (each writes its own temporary file; before, one of two failed at once).
/// Unix only: on Windows a rename over a file that another save is renaming
/// at the same moment can fail with "Access denied" (an error, never a torn
/// file), as Wine showed.
#[cfg(unix)]
#[test]
fn concurrent_saves_to_one_path_end_with_one_whole_file() {
    let dir = test_dir("concurrent");
    let target = dir.join("c.safetensors");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let target = target.clone();
            std::thread::spawn(move || {
                for k in 0..5 {
                    save_either(t % 2, (t * 10 + k) as f32, &target).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let saved = candle::safetensors::load(&target, &Device::Cpu).unwrap();
    let v = values(&saved["bn.running_var"]);
    assert!(v.iter().all(|&x| x == v[0]), "{v:?}");
    assert!(
        (0..4).any(|t| v[0] == (t * 10 + 4) as f64),
        "not a last save: {v:?}"
    );
    assert_checkpoint_holds(&target, v[0] as f32);
    assert_eq!(listing(&dir), ["c.safetensors"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(unix)]
const PLANTED_ROLE_ENV: &str = "CANDLE_SYNCBN_TEST_PLANTED_ROLE";

/// Runs this test binary's test `name` as a child with `role` in
/// [`PLANTED_ROLE_ENV`], through `sh` under `umask 022`.
#[cfg(unix)]
fn spawn_role(name: &str, role: &str, stdio: bool) -> std::process::Child {
    use std::process::Stdio;
    std::process::Command::new("sh")
        .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(std::env::current_exe().unwrap())
        .arg(common::test_path(module_path!(), name))
        .args(["--exact", "--test-threads=1", "--nocapture"])
        .env(PLANTED_ROLE_ENV, role)
        .stdin(if stdio { Stdio::piped() } else { Stdio::null() })
        .stdout(if stdio {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .unwrap()
}

/// What an attacker plants at the temporary name the saves used before,
/// `.<name>.tmp`, is never used: a symlink's target and a hard link's file
/// keep their bytes, a world-writable file there does not make the
/// checkpoint world-writable (it is the saver's, mode 0644 under umask 022),
/// and another process's lock on it does not block the save. (Random names
/// the saves draw now are covered by `atomic_file`'s unit tests.) Runs
/// itself in a child under `umask 022`; the lock holder is another child.
#[cfg(unix)]
#[test]
fn saves_never_use_what_is_planted_at_a_temp_name() {
    use std::io::{BufRead, Read};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let name = "saves_never_use_what_is_planted_at_a_temp_name";
    match std::env::var(PLANTED_ROLE_ENV).ok().as_deref() {
        Some(p) if p.starts_with("hold:") => {
            // The lock holder: locks the file, says so, and holds it until
            // its stdin closes.
            let f = std::fs::File::open(&p[5..]).unwrap();
            f.lock().unwrap();
            println!("locked");
            std::io::stdout().flush().unwrap();
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            return;
        }
        Some("saver") => {}
        _ => {
            let status = spawn_role(name, "saver", false).wait().unwrap();
            assert!(status.success(), "the saving child failed: {status}");
            return;
        }
    }
    let dir = test_dir("planted");
    let fresh = dir.join("fresh");
    std::fs::write(&fresh, b"").unwrap();
    let me = std::fs::metadata(&fresh).unwrap();
    assert_eq!(me.mode() & 0o777, 0o644, "the child's umask is not 022");
    for (i, file) in ["ckpt.safetensors", "dp.safetensors"].iter().enumerate() {
        let target = dir.join(file);
        let tmp = dir.join(format!(".{file}.tmp"));
        let victim = dir.join(format!("victim-{i}"));
        std::fs::write(&victim, b"victim").unwrap();

        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        save_either(i, 2.5, &target).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        assert!(std::fs::symlink_metadata(&target).unwrap().is_file());
        assert_checkpoint_holds(&target, 2.5);
        std::fs::remove_file(&tmp).unwrap();

        std::fs::hard_link(&victim, &tmp).unwrap();
        save_either(i, 3.0, &target).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        assert_checkpoint_holds(&target, 3.0);
        std::fs::remove_file(&tmp).unwrap();

        std::fs::write(&tmp, b"planted").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).unwrap();
        save_either(i, 3.5, &target).unwrap();
        assert_checkpoint_holds(&target, 3.5);
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o644, "{target:?}");
        assert_eq!((meta.uid(), meta.gid()), (me.uid(), me.gid()));
        assert_eq!(meta.nlink(), 1);

        // Another process holds a lock on it.
        let mut holder = spawn_role(name, &format!("hold:{}", tmp.display()), true);
        // (After, or on the line of, the test harness's own output.)
        let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
        let mut line = String::new();
        for _ in 0..8 {
            line.clear();
            out.read_line(&mut line).unwrap();
            if line.trim_end().ends_with("locked") || line.is_empty() {
                break;
            }
        }
        assert!(line.trim_end().ends_with("locked"), "{line:?}");
        let saved = save_either(i, 4.0, &target);
        drop(holder.stdin.take());
        holder.wait().unwrap();
        drop(out);
        saved.unwrap();
        assert_checkpoint_holds(&target, 4.0);
        // Not the saves' to take or remove.
        assert_eq!(std::fs::read(&tmp).unwrap(), b"planted");
        std::fs::remove_file(&tmp).unwrap();
        std::fs::remove_file(&victim).unwrap();
    }
    assert_eq!(
        listing(&dir),
        ["ckpt.safetensors", "dp.safetensors", "fresh"]
    );
    std::fs::remove_dir_all(&dir).ok();
}

const KILLED_SAVE_ENV: &str = "CANDLE_SYNCBN_TEST_KILLED_SAVE_DIR";

/// Real kills: this test runs itself as a child process that saves a 32 MiB
/// checkpoint over and over, and kills it (SIGKILL on Unix) as soon as a
/// temporary file has content beside the checkpoint, three times. The next save leaves nothing
/// but the checkpoint beside it (before: one temporary file per killed
/// process, plus the `safetensors` crate's own).
#[test]
fn killed_saves_leave_no_temp_files() {
    if let Some(dir) = std::env::var_os(KILLED_SAVE_ENV) {
        // The child: save until killed (bounded, in case no one does).
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        vb.get_with_hints(8 << 20, "big", candle_nn::Init::Const(1.0))
            .unwrap();
        for _ in 0..500 {
            save_checkpoint(&varmap, Path::new(&dir).join("m.safetensors")).unwrap();
        }
        return;
    }
    let dir = test_dir("killed");
    // The temporary files beside the checkpoint, whatever their names.
    let temps = || -> Vec<(std::ffi::OsString, std::time::SystemTime, u64)> {
        let mut t: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name() != "m.safetensors")
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((e.file_name(), m.modified().ok()?, m.len()))
            })
            .collect();
        t.sort();
        t
    };
    let mut kills_that_left_a_temp = 0;
    for _ in 0..3 {
        let before = temps();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .arg(common::test_path(
                module_path!(),
                "killed_saves_leave_no_temp_files",
            ))
            .args(["--exact", "--test-threads=1"])
            .env(KILLED_SAVE_ENV, &dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill as soon as a save is writing: a temporary file is new or changed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline
            && !temps().iter().any(|t| t.2 > 0 && !before.contains(t))
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "the saving child finished before it was killed"
        );
        if !temps().is_empty() {
            kills_that_left_a_temp += 1;
        }
        // The checkpoint (once a save completed) is whole.
        let ckpt = dir.join("m.safetensors");
        if ckpt.exists() {
            let saved = candle::safetensors::load(&ckpt, &Device::Cpu).unwrap();
            assert_eq!(saved["big"].dims(), [8 << 20]);
        }
    }
    // (A kill can land between two saves; three all doing so is unlikely.)
    assert!(kills_that_left_a_temp > 0, "no kill landed during a save");
    // Whatever the kills left (a temporary file at most), the next save cleans.
    save_checkpoint(&bn_varmap(1.5), dir.join("m.safetensors")).unwrap();
    assert_eq!(listing(&dir), ["m.safetensors"]);
    assert_checkpoint_holds(&dir.join("m.safetensors"), 1.5);
    std::fs::remove_dir_all(&dir).ok();
}

/// A layer converted with `from_batch_norm` saves its `num_batches_tracked`
/// once registered with `with_counter` (the count so far kept, later steps
/// counted in the map's variable); unregistered, the checkpoint has none.
#[test]
fn converted_layers_save_their_counters_once_registered() {
    let dir = test_dir("converted-counters");
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (6, 4, 3), &dev).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let nn = candle_nn::batch_norm(4, 1e-5, vb.pp("bn")).unwrap();
    let plain = candle_nn::batch_norm(4, 1e-5, vb.pp("plain")).unwrap();
    let sync = SyncBatchNorm::from_batch_norm(&nn, ProcessGroup::single())
        .unwrap()
        .with_name("bn");
    let unregistered = SyncBatchNorm::from_batch_norm(&plain, ProcessGroup::single()).unwrap();
    for _ in 0..2 {
        sync.forward_t(&x, true).unwrap();
        unregistered.forward_t(&x, true).unwrap();
    }
    let sync = sync.with_counter(vb.pp("bn")).unwrap();
    for _ in 0..2 {
        sync.forward_t(&x, true).unwrap();
    }
    assert_eq!(sync.num_batches_tracked().unwrap(), 4);
    let path = dir.join("converted.safetensors");
    save_checkpoint(&varmap, &path).unwrap();
    let sd = read_state_dict(&path, &LoadOptions::default()).unwrap();
    assert_eq!(
        sd["bn.num_batches_tracked"].to_scalar::<i64>().unwrap(),
        4,
        "{:?}",
        sd.keys()
    );
    assert!(!sd.contains_key("plain.num_batches_tracked"));
    // Registering again over the map's counter (as after loading a
    // checkpoint) takes the map's value.
    let again = SyncBatchNorm::from_batch_norm(&nn, ProcessGroup::single())
        .unwrap()
        .with_counter(vb.pp("bn"))
        .unwrap();
    assert_eq!(again.num_batches_tracked().unwrap(), 4);
    // A layer without running statistics has no counter to register.
    let untracked = SyncBatchNorm::new(
        4,
        candle_syncbn::SyncBatchNormConfig::default().with_track_running_stats(false),
        vb.pp("untracked"),
        ProcessGroup::single(),
    )
    .unwrap();
    let e = untracked
        .with_counter(vb.pp("untracked"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'untracked'") && e.contains("no running statistics"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
