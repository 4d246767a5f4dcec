//! The pack of one gradient bucket for `data_parallel::average_gradients`:
//! every gradient of the bucket (a zero block for a missing one) converted
//! to the dtype the bucket is reduced in and divided by the world size, in
//! one pass into one flat tensor (on the CPU; on other devices a `cat` of
//! converted gradients followed by the division, on the device).

use candle::{DType, Device, Result, Storage, Tensor, WithDType};

/// One gradient of a bucket: the tensor, or `None` for a variable without a
/// gradient on this rank (zeros), with the variable's element count.
pub(crate) type Part<'a> = (Option<&'a Tensor>, usize);

/// `parts` packed into a flat tensor of `dtype` on `device`, each value
/// divided by `world` (the average's division folded into the pack).
pub(crate) fn pack_scaled(
    parts: &[Part],
    dtype: DType,
    world: usize,
    device: &Device,
) -> Result<Tensor> {
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
        return Tensor::cat(&flat, 0)? / world as f64;
    }
    match dtype {
        DType::F32 => pack_cpu::<f32>(parts, world),
        DType::F64 => pack_cpu::<f64>(parts, world),
        DType::BF16 => pack_cpu::<half::bf16>(parts, world),
        DType::F16 => pack_cpu::<half::f16>(parts, world),
        d => candle::bail!("average_gradients: cannot reduce gradients in {d:?}"),
    }
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
            let p = pack_scaled(&parts, dtype, 3, &d).unwrap();
            assert_eq!(p.dtype(), dtype);
            let got = p.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{got:?}");
            }
        }
    }
}
