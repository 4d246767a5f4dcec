//! The tensor entries of a torch.save state dict, taken from the object
//! candle's pickle reader builds, with checked arithmetic.
//!
//! candle's `read_pth_tensor_info` finds the same entries, but computes a
//! tensor's byte offset as `storage_offset * element size` in wrapping
//! arithmetic (an offset of 2^62 + 1 floats is byte 4 in a release build, a
//! panic in a debug build), casts a negative offset to `usize`, panics on
//! argument tuples shorter than it expects, and prints a whole malformed
//! entry with `{:?}`. [`tensor_entries`] picks the entries candle would (the
//! same rules, the same names, later names winning) but reads their layout
//! with every product and sum checked, and returns an error naming the
//! tensor where candle would panic or compute a wrong layout. Entries candle
//! skips (not a tensor, an unsupported storage type, a malformed argument)
//! are skipped here too.

use crate::error::{error, ErrorKind};
use candle::pickle::Object;
use candle::{DType, Result};

/// A tensor of a `.pth` state dict, its layout checked for overflow.
#[derive(Debug, Clone)]
pub(crate) struct TensorEntry {
    /// Its name in the state dict.
    pub(crate) name: String,
    /// Its dtype (from the storage class).
    pub(crate) dtype: DType,
    /// The zip entry of its storage, as candle names it.
    pub(crate) storage: String,
    /// Its shape.
    pub(crate) dims: Vec<usize>,
    /// Its strides, in elements.
    pub(crate) strides: Vec<usize>,
    /// The byte of its storage where it starts.
    pub(crate) start: usize,
    /// The bytes its elements take.
    pub(crate) bytes: usize,
}

impl TensorEntry {
    /// Row-major contiguous (C order).
    pub(crate) fn is_contiguous(&self) -> bool {
        packed(self.dims.iter().rev().zip(self.strides.iter().rev()))
    }

    /// Column-major contiguous (Fortran order, e.g. a transposed array).
    pub(crate) fn is_fortran_contiguous(&self) -> bool {
        packed(self.dims.iter().zip(self.strides.iter()))
    }
}

/// Whether the strides are the running products of the dims (dims of 1 may
/// have any stride), as candle's `Shape::is_contiguous` checks, without its
/// unchecked product.
fn packed<'a>(mut dims_strides: impl Iterator<Item = (&'a usize, &'a usize)>) -> bool {
    let mut acc = Some(1usize);
    dims_strides.all(|(&dim, &stride)| {
        let ok = dim <= 1 || acc == Some(stride);
        acc = acc.and_then(|a| a.checked_mul(dim));
        ok
    })
}

/// The tensor entries of `obj`, the result of the pickle `<dir>.pkl` of the
/// archive, as candle's `read_pth_tensor_info` picks them (under `key`, as
/// its `key` argument). `what` names the file in errors.
pub(crate) fn tensor_entries(
    obj: Object,
    dir: &str,
    key: Option<&str>,
    what: &str,
) -> Result<Vec<TensorEntry>> {
    // A TorchScript module: its state is the argument of BUILD.
    let obj = match obj {
        Object::Build { callable, args } => match *callable {
            Object::Reduce { callable, .. } => match *callable {
                Object::Class {
                    module_name,
                    class_name,
                } if module_name == "__torch__" && class_name == "Module" => *args,
                _ => return Ok(Vec::new()),
            },
            _ => return Ok(Vec::new()),
        },
        obj => obj,
    };
    let obj = match (key, obj) {
        (Some(key), Object::Dict(entries)) => entries
            .into_iter()
            .find(|(k, _)| matches!(k, Object::Unicode(k) if k == key))
            .map(|(_, v)| v)
            .ok_or_else(|| {
                error(
                    ErrorKind::BadCheckpoint,
                    format!("{what}: key {key} not found"),
                )
            })?,
        (_, obj) => obj,
    };
    let Object::Dict(entries) = obj else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (name, value) in entries {
        let Object::Unicode(name) = name else {
            continue;
        };
        let err = |msg: String| {
            error(
                ErrorKind::BadCheckpoint,
                format!("{what}: tensor '{name}': {msg}"),
            )
        };
        if let Some(entry) = tensor_entry(value, dir).map_err(err)? {
            out.push(TensorEntry { name, ..entry });
        }
    }
    Ok(out)
}

/// Removes item `i` of a tuple candle indexes without checking its length.
fn take(
    items: &mut Vec<Object>,
    i: usize,
    what: &str,
    want: usize,
) -> std::result::Result<Object, String> {
    if i < items.len() {
        Ok(items.remove(i))
    } else {
        Err(format!(
            "{what} has {} arguments, expected at least {want} (candle's reader would panic)",
            items.len()
        ))
    }
}

/// A tuple of non-negative `Int`s (candle accepts nothing else for a shape
/// or strides).
fn usizes(obj: Object) -> Option<Vec<usize>> {
    let Object::Tuple(items) = obj else {
        return None;
    };
    items
        .into_iter()
        .map(|o| match o {
            Object::Int(v) => usize::try_from(v).ok(),
            _ => None,
        })
        .collect()
}

/// The entry `value` (its name left empty), `None` where candle skips it;
/// an error where candle would panic or compute a wrong layout.
fn tensor_entry(value: Object, dir: &str) -> std::result::Result<Option<TensorEntry>, String> {
    let Object::Reduce { callable, args } = value else {
        return Ok(None);
    };
    let (callable, args) = match *callable {
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._tensor" && class_name == "_rebuild_from_type_v2" => {
            let Object::Tuple(mut args) = *args else {
                return Ok(None);
            };
            let what = "_rebuild_from_type_v2";
            let callable = take(&mut args, 0, what, 3)?;
            // candle takes the third argument (the second after the removal).
            (callable, take(&mut args, 1, what, 3)?)
        }
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_parameter" => {
            let Object::Tuple(mut args) = *args else {
                return Ok(None);
            };
            match take(&mut args, 0, "_rebuild_parameter", 1)? {
                Object::Reduce { callable, args } => (*callable, *args),
                _ => return Ok(None),
            }
        }
        callable => (callable, *args),
    };
    match callable {
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        _ => return Ok(None),
    }
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks)
    let Object::Tuple(mut args) = args else {
        return Ok(None);
    };
    let what = "_rebuild_tensor_v2";
    let stride = take(&mut args, 3, what, 4)?;
    let size = take(&mut args, 2, what, 4)?;
    let offset = take(&mut args, 1, what, 4)?;
    let storage = take(&mut args, 0, what, 4)?;
    let (Some(strides), Some(dims)) = (usizes(stride), usizes(size)) else {
        return Ok(None);
    };
    let offset = match offset {
        Object::Int(v) => i64::from(v),
        Object::Long(v) => v,
        _ => return Ok(None),
    };
    // ("storage", storage class, key, location, size)
    let Object::PersistentLoad(storage) = storage else {
        return Ok(None);
    };
    let Object::Tuple(mut storage) = *storage else {
        return Ok(None);
    };
    let what = "its persistent id";
    let size = take(&mut storage, 4, what, 5)?;
    let key = take(&mut storage, 2, what, 5)?;
    let class = take(&mut storage, 1, what, 5)?;
    let (Object::Int(_) | Object::Long(_), Object::Unicode(key), Object::Class { class_name, .. }) =
        (size, key, class)
    else {
        return Ok(None);
    };
    let dtype = match class_name.as_str() {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" => DType::U8,
        "LongStorage" => DType::I64,
        _ => return Ok(None),
    };
    let elem = dtype.size_in_bytes();
    let start = usize::try_from(offset)
        .ok()
        .and_then(|o| o.checked_mul(elem))
        .ok_or_else(|| {
            format!(
                "storage offset {offset} (elements of {elem} bytes) is negative or its byte \
                 offset overflows"
            )
        })?;
    let bytes = dims
        .iter()
        .try_fold(elem, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("shape {dims:?} overflows"))?;
    if strides.len() != dims.len() {
        return Err(format!(
            "shape {dims:?} with {} strides {strides:?}",
            strides.len()
        ));
    }
    Ok(Some(TensorEntry {
        name: String::new(),
        dtype,
        storage: format!("{dir}/{key}"),
        dims,
        strides,
        start,
        bytes,
    }))
}
