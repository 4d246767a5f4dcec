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

use candle::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

/// The on-disk format of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        let mut file = std::fs::File::open(path)
            .map_err(|e| candle::Error::Msg(format!("checkpoint {path:?}: cannot open: {e}")))?;
        let mut n = 0;
        while n < head.len() {
            match file.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => candle::bail!("checkpoint {path:?}: cannot read: {e}"),
            }
        }
        if n >= 4 && head[..4] == *b"PK\x03\x04" {
            Ok(Self::Pth)
        } else if n == 9 && head[8] == b'{' {
            Ok(Self::Safetensors)
        } else {
            candle::bail!(
                "checkpoint {path:?}: expected a safetensors file or a zip-based .pth (torch.save), \
                 got neither ({n} bytes read: {:?})",
                &head[..n]
            )
        }
    }
}

/// Options of [`load_checkpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// What [`load_checkpoint`] / [`load_state_dict`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
pub fn is_counter(name: &str) -> bool {
    name == "num_batches_tracked" || name.ends_with(".num_batches_tracked")
}

/// Reads every tensor of a safetensors or `.pth` checkpoint onto the CPU,
/// applying [`LoadOptions::pth_key`] and [`LoadOptions::strip_prefix`].
pub fn read_state_dict<P: AsRef<Path>>(
    path: P,
    options: &LoadOptions,
) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let wrap = |e: candle::Error| candle::Error::Msg(format!("checkpoint {path:?}: {e}"));
    let tensors: Vec<(String, Tensor)> = match CheckpointFormat::detect(path)? {
        CheckpointFormat::Safetensors => candle::safetensors::load(path, &Device::Cpu)
            .map_err(wrap)?
            .into_iter()
            .collect(),
        CheckpointFormat::Pth => {
            candle::pickle::read_all_with_key(path, options.pth_key.as_deref()).map_err(wrap)?
        }
    };
    if tensors.is_empty() {
        candle::bail!(
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
            candle::bail!(
                "checkpoint {path:?}: two tensors are named '{name}' after stripping the prefix {:?}",
                options.strip_prefix
            )
        }
    }
    Ok(out)
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
    load_state_dict(varmap, &state_dict, options.strict)
        .map_err(|e| candle::Error::Msg(format!("checkpoint {path:?}: {e}")))
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
        candle::bail!(
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
/// scalars, and `{"format": "pt"}` metadata.
pub fn save_checkpoint<P: AsRef<Path>>(varmap: &VarMap, path: P) -> Result<()> {
    let path = path.as_ref();
    let tensors = state_dict(varmap)?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(
        tensors.iter().map(|(k, t)| (k.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| candle::Error::Msg(format!("checkpoint {path:?}: cannot save: {e}")))
}
