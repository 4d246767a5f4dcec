//! Loading and saving BatchNorm checkpoints in PyTorch's and candle-nn's layouts.
//!
//! PyTorch's `BatchNorm*d` and `SyncBatchNorm` state dicts hold, per layer,
//! `weight`, `bias`, `running_mean`, `running_var` (f32) and
//! `num_batches_tracked` (an i64 scalar); candle-nn's `BatchNorm` has the same
//! names without `num_batches_tracked`. This module moves such checkpoints in
//! and out of a `VarMap`:
//!
//! - [`load_checkpoint`] reads safetensors or `.pth` (PyTorch's zip format,
//!   through candle's pickle reader; [`LoadOptions::pth_key`] picks a nested
//!   state dict and [`LoadOptions::strip_prefix`] drops e.g. DDP's `module.`)
//!   and sets every variable of the map. A `num_batches_tracked` the file lacks
//!   (a candle-nn checkpoint) is set to 0; one the map lacks (a model built
//!   with plain `candle_nn::batch_norm`) is ignored. Float tensors are
//!   converted to the variable's dtype; shapes must match. Nothing is changed
//!   unless every variable can be set.
//! - [`save_checkpoint`] writes safetensors with the variable names and
//!   PyTorch's dtypes (counters as i64 scalars) and `{"format": "pt"}`
//!   metadata, which `safetensors.torch.load_file` + `load_state_dict` accept.
//!
//! Building a model straight from a file also works without this module:
//! `VarBuilder::from_mmaped_safetensors` / `VarBuilder::from_pth` feed
//! [`crate::SyncBatchNorm::new`], which loads `num_batches_tracked` when present
//! and starts it at 0 otherwise. Use a `VarMap` and [`load_checkpoint`] when
//! the model is trained and saved again.
//!
//! # Files from the internet
//!
//! A `.pth` is a pickle, and candle's pickle reader trusts it: a deeply nested
//! pickle overflows its stack (an abort, not an error), memo copies and tensor
//! shapes make it allocate what the pickle declares. [`load_checkpoint`] and
//! [`read_state_dict`] therefore scan every pickle of the archive first
//! (linear, no recursion) and refuse nesting deeper than 256 levels, pickles
//! that would make candle's reader allocate more than 48 times the file's
//! size (at least 192 MiB; every copy through its memo counted by the bytes
//! it copies, strings and class names included), unsupported opcodes and
//! truncated arguments, and tensors whose bytes are not within their storage
//! (offsets, shapes and strides in checked arithmetic) or, in all, take more
//! than 4 times the file; errors name the file, the zip entry and the byte
//! offset, or the tensor. Loading a file so costs at most 64 times its size,
//! or 256 MiB for small files. [`check_pth`] runs the same checks for files
//! you pass to `VarBuilder::from_pth` yourself. torch.save's legacy (non-zip)
//! format is not read at all. Safetensors files are checked by the
//! `safetensors` crate (header size, offsets within the file) after
//! [`check_safetensors`] has counted the header's entries without parsing it
//! (at most 65 536, or one per 64 bytes of tensor data).

use super::pth_entries::{self, TensorEntry};
use super::{pickle_guard, safetensors_guard};
use crate::error::{bail_kind, error, ErrorKind};
use candle::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

/// The on-disk format of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckpointFormat {
    /// A safetensors file.
    Safetensors,
    /// A PyTorch `torch.save` file (zip archive with a pickle).
    Pth,
}

impl CheckpointFormat {
    /// Detects the format from the first bytes of the file (not its name).
    pub fn detect<P: AsRef<Path>>(path: P) -> Result<Self> {
        let path = path.as_ref();
        let mut head = [0u8; 9];
        let mut file = std::fs::File::open(path).map_err(|e| {
            error(
                ErrorKind::BadCheckpoint,
                format!("checkpoint {path:?}: cannot open: {e}"),
            )
        })?;
        let mut n = 0;
        while n < head.len() {
            match file.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => bail_kind!(
                    ErrorKind::BadCheckpoint,
                    "checkpoint {path:?}: cannot read: {e}"
                ),
            }
        }
        if n >= 4 && head[..4] == *b"PK\x03\x04" {
            Ok(Self::Pth)
        } else if n == 9 && head[8] == b'{' {
            Ok(Self::Safetensors)
        } else {
            bail_kind!(
                ErrorKind::BadCheckpoint,
                "checkpoint {path:?}: expected a safetensors file or a zip-based .pth (torch.save), \
                 got neither ({n} bytes read: {:?})",
                &head[..n]
            )
        }
    }
}

/// Options of [`load_checkpoint`]: [`Default`] (strict), then the `with_*`
/// setters (non-exhaustive, so that a new option is not a breaking change).
///
/// ```
/// use candle_syncbn::convert::checkpoint::LoadOptions;
///
/// let options = LoadOptions::default().with_pth_key("state_dict").with_strip_prefix("module.");
/// assert!(options.strict);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Fail if the file lacks a variable of the map, or has a tensor the map
    /// lacks (as PyTorch's `load_state_dict(strict=True)`). `num_batches_tracked`
    /// entries are exempt both ways. Default `true`.
    pub strict: bool,
    /// For `.pth` files holding a dict around the state dict (e.g.
    /// `{"state_dict": …, "epoch": …}`): the key of the state dict.
    pub pth_key: Option<String>,
    /// A prefix to drop from the file's names before matching, e.g. `"module."`
    /// for state dicts saved from a `DistributedDataParallel` model. Names
    /// without it are kept as they are.
    pub strip_prefix: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            strict: true,
            pth_key: None,
            strip_prefix: None,
        }
    }
}

impl LoadOptions {
    /// The options with [`strict`](Self::strict) set.
    pub fn with_strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// The options reading the state dict under `key` of a `.pth` dict.
    pub fn with_pth_key(mut self, key: impl Into<String>) -> Self {
        self.pth_key = Some(key.into());
        self
    }

    /// The options dropping `prefix` from the file's names.
    pub fn with_strip_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.strip_prefix = Some(prefix.into());
        self
    }
}

/// What [`load_checkpoint`] / [`load_state_dict`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadReport {
    /// Variables set from the file (sorted).
    pub loaded: Vec<String>,
    /// `num_batches_tracked` variables the file lacks, set to 0 (sorted).
    pub counters_defaulted: Vec<String>,
    /// Other variables the file lacks, left unchanged (only when not strict; sorted).
    pub missing: Vec<String>,
    /// Tensors of the file the map has no variable for (sorted).
    pub unexpected: Vec<String>,
}

/// Whether `name` is a BatchNorm batch counter.
pub(crate) fn is_counter(name: &str) -> bool {
    name == "num_batches_tracked" || name.ends_with(".num_batches_tracked")
}

/// Reads every tensor of a safetensors or `.pth` checkpoint onto the CPU,
/// applying [`LoadOptions::pth_key`] and [`LoadOptions::strip_prefix`].
pub fn read_state_dict<P: AsRef<Path>>(
    path: P,
    options: &LoadOptions,
) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let wrap = |e: candle::Error| {
        error(
            ErrorKind::BadCheckpoint,
            format!("checkpoint {path:?}: {e}"),
        )
    };
    let tensors: Vec<(String, Tensor)> = match CheckpointFormat::detect(path)? {
        CheckpointFormat::Safetensors => {
            safetensors_guard::check(path)?;
            candle::safetensors::load(path, &Device::Cpu)
                .map_err(wrap)?
                .into_iter()
                .collect()
        }
        CheckpointFormat::Pth => read_pth(path, options.pth_key.as_deref())?,
    };
    if tensors.is_empty() {
        bail_kind!(
            ErrorKind::BadCheckpoint,
            "checkpoint {path:?}: expected a state dict of tensors, found no tensors{}",
            if options.pth_key.is_none() {
                " (for a .pth holding a dict around the state dict, set LoadOptions::pth_key)"
            } else {
                ""
            }
        )
    }
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let name = match &options.strip_prefix {
            Some(p) => name.strip_prefix(p.as_str()).unwrap_or(&name).to_string(),
            None => name,
        };
        if out.insert(name.clone(), t).is_some() {
            bail_kind!(
                ErrorKind::BadCheckpoint,
                "checkpoint {path:?}: two tensors are named '{name}' after stripping the prefix {:?}",
                options.strip_prefix
            )
        }
    }
    Ok(out)
}

/// Tensors of a `.pth` may take at most this many times the file's size in
/// all (torch.save stores each storage once, uncompressed; tensors sharing a
/// storage, as tied weights, read it again).
const PTH_TENSOR_BYTES_PER_FILE_BYTE: u64 = 4;

/// Checks a `.pth` file the way [`load_checkpoint`] does before reading it:
/// every pickle in the archive passes a linear pre-scan (nesting at most 256
/// levels deep, at most 48 times the file's size or 192 MiB allocated by
/// candle's reader, copies through its memo included, only opcodes candle
/// reads, no truncated argument), and every tensor of the
/// state dict (the one under `key`, as [`LoadOptions::pth_key`]) has a
/// contiguous layout within its storage, whose size is in proportion to the
/// file. Call it before `VarBuilder::from_pth` on files you did not write:
/// candle's pickle reader recurses once per level of nesting (a deep pickle
/// aborts the process) and allocates each tensor at the size the pickle
/// declares before reading it.
pub fn check_pth<P: AsRef<Path>>(path: P, key: Option<&str>) -> Result<()> {
    PthArchive::open(path.as_ref(), key).map(|_| ())
}

/// Checks a safetensors file the way [`load_checkpoint`] does before parsing
/// it: the header's declared length is within the file and the
/// `safetensors` crate's 100 MB limit, and the header lists at most 65 536
/// entries, or one per 64 bytes of tensor data if that is more, counted
/// without parsing it. Call it before `VarBuilder::from_mmaped_safetensors`
/// on files you did not write: the `safetensors` crate parses the whole
/// header into a map and candle builds a tensor per entry (a 52 MB header of
/// 845 000 empty tensors took 710 MB and 13 s).
pub fn check_safetensors<P: AsRef<Path>>(path: P) -> Result<()> {
    safetensors_guard::check(path.as_ref())
}

/// A `.pth` whose pickles passed the pre-scan, with its tensors' layouts.
struct PthArchive<'a> {
    path: &'a Path,
    zip: zip::ZipArchive<std::io::BufReader<std::fs::File>>,
    /// Later names win, as in candle's `PthTensors`.
    tensors: HashMap<String, TensorEntry>,
}

impl<'a> PthArchive<'a> {
    fn open(path: &'a Path, key: Option<&str>) -> Result<Self> {
        let err = |msg: String| {
            error(
                ErrorKind::BadCheckpoint,
                format!("checkpoint {path:?}: {msg}"),
            )
        };
        let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| err(format!("cannot read: {e}")))?
            .len();
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| err(format!("not a readable zip archive: {e}")))?;
        // The entries candle's `read_pth_tensor_info` parses, found the same way.
        let names = zip
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<std::result::Result<Vec<String>, _>>()
            .map_err(|e| err(format!("unreadable zip entry name: {e}")))?;
        // One budget for all of them: a zip may name the same (compressed)
        // data many times.
        let limits = pickle_guard::Limits::for_file_len(file_len);
        let mut spent = 0;
        let pickles: Vec<&String> = names.iter().filter(|n| n.ends_with("data.pkl")).collect();
        for name in &pickles {
            let entry = zip
                .by_name(name)
                .map_err(|e| err(format!("cannot open {name}: {e}")))?;
            let what = format!("checkpoint {path:?}: {name}");
            spent = pickle_guard::scan(std::io::BufReader::new(entry), &what, limits, spent)?.spent;
        }
        let mut tensors = HashMap::new();
        for name in pickles {
            let entry = zip
                .by_name(name)
                .map_err(|e| err(format!("cannot open {name}: {e}")))?;
            let obj = without_panics(path, || {
                let mut stack = candle::pickle::Stack::empty();
                stack.read_loop(&mut std::io::BufReader::new(entry))?;
                stack.finalize()
            })?;
            let dir = name.strip_suffix(".pkl").unwrap_or(name);
            let what = format!("checkpoint {path:?}");
            for entry in pth_entries::tensor_entries(obj, dir, key, &what)? {
                tensors.insert(entry.name.clone(), entry);
            }
        }
        let mut archive = Self { path, zip, tensors };
        let mut total = 0u64;
        let names: Vec<String> = archive.tensors.keys().cloned().collect();
        for name in names {
            let entry = archive.tensors[&name].clone();
            total = total.saturating_add(archive.check_tensor(&entry)? as u64);
        }
        let limit = file_len.saturating_mul(PTH_TENSOR_BYTES_PER_FILE_BYTE);
        if total > limit {
            return Err(err(format!(
                "its tensors take {total} bytes, more than {PTH_TENSOR_BYTES_PER_FILE_BYTE} \
                 times the file's {file_len} bytes (a compressed or hostile archive?)"
            )));
        }
        Ok(archive)
    }

    /// The bytes of `entry`, checked to lie within its storage.
    fn check_tensor(&mut self, entry: &TensorEntry) -> Result<usize> {
        let path = self.path;
        let name = &entry.name;
        let err = |msg: String| {
            error(
                ErrorKind::BadCheckpoint,
                format!("checkpoint {path:?}: tensor '{name}': {msg}"),
            )
        };
        if !entry.is_contiguous() && !entry.is_fortran_contiguous() {
            return Err(err(format!(
                "expected a contiguous layout, got shape {:?} with strides {:?}",
                entry.dims, entry.strides
            )));
        }
        let (start, bytes) = (entry.start, entry.bytes);
        let size = self
            .zip
            .by_name(&entry.storage)
            .map_err(|e| err(format!("its storage {}: {e}", entry.storage)))?
            .size();
        match start.checked_add(bytes) {
            Some(end) if end as u64 <= size => Ok(bytes),
            _ => Err(err(format!(
                "expected its {bytes} bytes from byte {start} of its storage {}, \
                 which holds {size} bytes",
                entry.storage
            ))),
        }
    }

    /// Reads every tensor onto the CPU, as candle's `PthTensors::get` does
    /// (Fortran-ordered ones are permuted into the shape they were saved with).
    fn read_all(mut self) -> Result<Vec<(String, Tensor)>> {
        if cfg!(target_endian = "big") {
            bail_kind!(
                ErrorKind::BadCheckpoint,
                "checkpoint {:?}: reading .pth files needs a little-endian machine",
                self.path
            )
        }
        let tensors = std::mem::take(&mut self.tensors);
        let mut out = Vec::with_capacity(tensors.len());
        for (name, entry) in tensors {
            let bytes = self.check_tensor(&entry)?;
            let path = self.path;
            let err = |e: std::io::Error| {
                error(
                    ErrorKind::BadCheckpoint,
                    format!("checkpoint {path:?}: tensor '{name}': cannot read: {e}"),
                )
            };
            let mut reader = self
                .zip
                .by_name(&entry.storage)
                .map_err(|e| err(std::io::Error::other(e)))?;
            std::io::copy(
                &mut reader.by_ref().take(entry.start as u64),
                &mut std::io::sink(),
            )
            .map_err(err)?;
            let mut data = vec![0u8; bytes];
            reader.read_exact(&mut data).map_err(err)?;
            let rank = entry.dims.len();
            let t = if rank > 1 && !entry.is_contiguous() {
                let reversed: Vec<usize> = entry.dims.iter().rev().copied().collect();
                let axes: Vec<usize> = (0..rank).rev().collect();
                Tensor::from_raw_buffer(&data, entry.dtype, &reversed, &Device::Cpu)?
                    .permute(axes)?
            } else {
                Tensor::from_raw_buffer(&data, entry.dtype, &entry.dims, &Device::Cpu)?
            };
            out.push((name, t));
        }
        Ok(out)
    }
}

/// Reads the tensors of a `.pth` file after [`check_pth`]'s checks.
fn read_pth(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    PthArchive::open(path, key)?.read_all()
}

/// Runs candle's pickle reader, turning a panic into an error: none is known
/// on a pickle that passed the pre-scan (candle's own panics were in the
/// tensor entries, which `pth_entries` reads with checks), but a file from
/// the internet must not take the process down through one missed.
fn without_panics<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(
            ErrorKind::BadCheckpoint,
            format!("checkpoint {path:?}: {e}"),
        )),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(error(
                ErrorKind::BadCheckpoint,
                format!(
                    "checkpoint {path:?}: candle's pickle reader failed on the state dict \
                 (a malformed tensor entry?): {msg}"
                ),
            ))
        }
    }
}

/// Loads a checkpoint file into the variables of `varmap` (see the module
/// docs for the rules). Errors name the file and every offending variable
/// with the expected and actual shape or dtype; on error no variable is changed.
pub fn load_checkpoint<P: AsRef<Path>>(
    varmap: &VarMap,
    path: P,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let path = path.as_ref();
    let state_dict = read_state_dict(path, options)?;
    load_state_dict(varmap, &state_dict, options.strict).map_err(|e| {
        error(
            ErrorKind::BadCheckpoint,
            format!("checkpoint {path:?}: {e}"),
        )
    })
}

/// Sets the variables of `varmap` from an in-memory state dict (names as in
/// the map). See the module docs for the rules; on error nothing is changed.
pub fn load_state_dict(
    varmap: &VarMap,
    state_dict: &HashMap<String, Tensor>,
    strict: bool,
) -> Result<LoadReport> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let names: BTreeSet<&String> = data.keys().collect();
    let mut report = LoadReport::default();
    let mut problems = Vec::new();
    let mut updates = Vec::new();
    for name in &names {
        let var = &data[*name];
        let target = var.as_tensor();
        match state_dict.get(*name) {
            Some(t) => match conform(name, t, target) {
                Ok(t) => {
                    updates.push((var, t));
                    report.loaded.push(name.to_string());
                }
                Err(msg) => problems.push(msg),
            },
            None if is_counter(name) => {
                let zero = Tensor::zeros(target.shape(), target.dtype(), target.device())?;
                updates.push((var, zero));
                report.counters_defaulted.push(name.to_string());
            }
            None => report.missing.push(name.to_string()),
        }
    }
    let mut unexpected: Vec<String> = state_dict
        .keys()
        .filter(|k| !data.contains_key(*k))
        .cloned()
        .collect();
    unexpected.sort();
    report.unexpected = unexpected;
    if strict {
        if !report.missing.is_empty() {
            problems.push(format!(
                "missing from the checkpoint: {}",
                report.missing.join(", ")
            ));
        }
        let extra: Vec<&str> = report
            .unexpected
            .iter()
            .filter(|k| !is_counter(k))
            .map(String::as_str)
            .collect();
        if !extra.is_empty() {
            problems.push(format!(
                "unexpected in the checkpoint (no such variable): {}",
                extra.join(", ")
            ));
        }
    }
    if !problems.is_empty() {
        bail_kind!(
            ErrorKind::BadCheckpoint,
            "cannot load the state dict, nothing was changed: {}",
            problems.join("; ")
        )
    }
    for (var, t) in updates {
        var.set(&t)?;
    }
    Ok(report)
}

/// `t` converted to the shape, dtype and device of the variable `target`, or
/// why it cannot be.
fn conform(name: &str, t: &Tensor, target: &Tensor) -> std::result::Result<Tensor, String> {
    let counter = is_counter(name);
    let same_shape = t.dims() == target.dims();
    // PyTorch counters are 0-d; accept any single-element tensor for them.
    let counter_shape = counter && t.elem_count() == 1 && target.elem_count() == 1;
    if !same_shape && !counter_shape {
        return Err(format!(
            "'{name}': expected shape {:?}, got {:?}",
            target.dims(),
            t.dims()
        ));
    }
    let (from, to) = (t.dtype(), target.dtype());
    if !counter && from.is_float() != to.is_float() {
        return Err(format!("'{name}': expected dtype {to:?}, got {from:?}"));
    }
    let converted = t
        .to_dtype(to)
        .and_then(|t| t.reshape(target.shape()))
        .and_then(|t| t.to_device(target.device()));
    converted.map_err(|e| format!("'{name}': cannot convert {from:?} to {to:?}: {e}"))
}

/// The variables of `varmap` as a state dict to save: sorted by name, on the
/// CPU, counters as i64 scalars (PyTorch's dtype), the others as stored.
pub fn state_dict(varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::with_capacity(data.len());
    for (name, var) in data.iter() {
        let t = var.as_tensor().to_device(&Device::Cpu)?;
        let t = if is_counter(name) {
            if t.elem_count() != 1 {
                candle::bail!(
                    "'{name}': expected a scalar num_batches_tracked, got shape {:?}",
                    t.dims()
                )
            }
            t.to_dtype(DType::I64)?.reshape(())?
        } else {
            t
        };
        out.push((name.clone(), t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Saves the variables of `varmap` as safetensors that PyTorch loads back:
/// the variable names, f32 parameters and statistics as stored (f16/bf16 models
/// save their dtype; PyTorch's `load_state_dict` casts), counters as i64
/// scalars, and `{"format": "pt"}` metadata. The file is replaced atomically,
/// through a fresh temporary file beside it (a random name, never a link or
/// file found there), renamed over it: a reader sees the old file or the new
/// one, the new one is the saver's with the mode the umask gives, a save
/// killed midway leaves the old file (the next save removes its temporary
/// file), and concurrent saves to one path end with one of them whole
/// (docs/converting.md).
pub fn save_checkpoint<P: AsRef<Path>>(varmap: &VarMap, path: P) -> Result<()> {
    let path = path.as_ref();
    let tensors = state_dict(varmap)?;
    crate::atomic_file::save_safetensors_atomic(path, &tensors, Some(&[("format", "pt")]))
}
