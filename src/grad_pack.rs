//! The pack of one gradient bucket for the gradient averaging
//! (`data_parallel::GradientAverager`): every gradient of the bucket (a zero
//! block for a missing one) converted to the dtype the bucket is reduced in,
//! in one flat tensor. On the CPU the pack also divides by the world size in
//! the same pass (the all-reduce then sums averages); on other devices it is
//! a `cat` of the converted gradients, and the division is left to the
//! reduction (`ProcessGroup::all_reduce_mean`: NCCL's `ncclAvg`), so that it
//! costs no pass of its own. Also how variables are split into buckets, for
//! the gradients and for `data_parallel::broadcast_varmap`.

use candle::{DType, Device, Result, Storage, Tensor, Var, WithDType};
use candle_nn::VarMap;

/// One gradient of a bucket: the tensor, or `None` for a variable without a
/// gradient on this rank (zeros), with the variable's element count.
pub(crate) type Part<'a> = (Option<&'a Tensor>, usize);

/// A packed bucket: the flat tensor, and whether its values were already
/// divided by the world size (then the average is their sum over the ranks,
/// else their mean).
pub(crate) struct Packed {
    pub flat: Tensor,
    pub divided: bool,
}

/// `parts` packed into a flat tensor of `dtype` on `device`; on the CPU each
/// value divided by `world` in the same pass (see [`Packed::divided`]).
pub(crate) fn pack(parts: &[Part], dtype: DType, world: usize, device: &Device) -> Result<Packed> {
    if !device.is_cpu()
        || parts
            .iter()
            .any(|(g, _)| g.is_some_and(|g| !g.device().is_cpu()))
    {
        let flat: Vec<Tensor> = parts
            .iter()
            .map(|&(g, n)| match g {
                Some(g) => g.to_dtype(dtype)?.flatten_all(),
                None => Tensor::zeros(n, dtype, device),
            })
            .collect::<Result<_>>()?;
        return Ok(Packed {
            flat: Tensor::cat(&flat, 0)?,
            divided: false,
        });
    }
    let flat = match dtype {
        DType::F32 => pack_cpu::<f32>(parts, world),
        DType::F64 => pack_cpu::<f64>(parts, world),
        DType::BF16 => pack_cpu::<half::bf16>(parts, world),
        DType::F16 => pack_cpu::<half::f16>(parts, world),
        d => candle::bail!("average_gradients: cannot reduce gradients in {d:?}"),
    }?;
    Ok(Packed {
        flat,
        divided: true,
    })
}

fn pack_cpu<D: WithDType>(parts: &[Part], world: usize) -> Result<Tensor> {
    let total: usize = parts.iter().map(|(_, n)| n).sum();
    let mut out: Vec<D> = Vec::with_capacity(total);
    let w = world as f64;
    for &(g, n) in parts {
        let Some(g) = g else {
            out.resize(out.len() + n, D::zero());
            continue;
        };
        let g = if g.is_contiguous() {
            g.clone()
        } else {
            g.contiguous()?
        };
        let (storage, layout) = g.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle::bail!("average_gradients: internal error: a CPU gradient off the CPU")
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle::Error::Msg("average_gradients: internal error: layout".into())
        })?;
        macro_rules! push {
            ($s:ty) => {
                out.extend(
                    cpu.as_slice::<$s>()?[start..end]
                        .iter()
                        .map(|v| D::from_f64(v.to_f64() / w)),
                )
            };
        }
        match g.dtype() {
            DType::F32 => push!(f32),
            DType::F64 => push!(f64),
            DType::BF16 => push!(half::bf16),
            DType::F16 => push!(half::f16),
            d => candle::bail!("average_gradients: gradients of dtype {d:?} cannot be averaged"),
        }
    }
    Tensor::from_vec(out, total, &Device::Cpu)
}

/// The default size of a gradient bucket: 25 MiB, as PyTorch's DDP.
pub(crate) const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// The variables of `varmap` sorted by name.
pub(crate) fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Splits `items` (with their dtype and byte size) into runs of equal dtype
/// of at most `bucket_bytes` each (a larger item gets a bucket of its own).
pub(crate) fn buckets(
    items: &[(DType, usize)],
    bucket_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, &(dtype, size)) in items.iter().enumerate() {
        if i > start && (dtype != items[start].0 || bytes + size > bucket_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < items.len() {
        out.push(start..items.len());
    }
    out
}

/// Splits a flat tensor into pieces of the given shapes.
pub(crate) fn unflatten(flat: &Tensor, shapes: &[&candle::Shape]) -> Result<Vec<Tensor>> {
    let mut offset = 0;
    shapes
        .iter()
        .map(|s| {
            let n = s.elem_count();
            let t = flat.narrow(0, offset, n)?.reshape(*s)?;
            offset += n;
            Ok(t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Contiguous, strided and missing gradients of mixed dtypes land in one
    /// flat tensor, converted and divided.
    #[test]
    fn packs_converts_and_divides_in_one_tensor() {
        let d = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &d).unwrap();
        let at = a.t().unwrap();
        let b = Tensor::new(&[6f64, -9.], &d)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let parts: [Part; 4] = [(Some(&a), 4), (None, 3), (Some(&at), 4), (Some(&b), 2)];
        let want = [1., 2., 3., 4., 0., 0., 0., 1., 3., 2., 4., 6., -9.].map(|v: f64| v / 3.0);
        for dtype in [DType::F32, DType::F64] {
            let p = pack(&parts, dtype, 3, &d).unwrap();
            assert!(p.divided);
            let p = p.flat;
            assert_eq!(p.dtype(), dtype);
            let got = p.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{got:?}");
            }
        }
    }

    #[test]
    fn bucket_split() {
        let items = [
            (DType::F32, 40),
            (DType::F32, 40),
            (DType::F32, 40),
            (DType::F64, 8),
            (DType::F32, 200),
            (DType::F32, 4),
        ];
        assert_eq!(buckets(&items, 100), vec![0..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(buckets(&items, 1000), vec![0..3, 3..4, 4..6]);
        assert!(buckets(&[], 10).is_empty());
    }
}
