//! The forward's per-channel coefficients, computed in the same op (and on a
//! GPU in the same launch) as the moments they are made of.

use super::{host_f64, unsupported_dtype};
use candle::{CpuStorage, DType, Device, Result, Tensor};

/// Values per channel of a coefficient tensor: the mean split in two
/// (`hi`, `lo`: `(x − hi) − lo` keeps the precision of `x − mean` in f32),
/// `invstd·weight`, `bias`, then zeros (slots the backward's kernels use).
pub const COEFFICIENTS_PER_CHANNEL: usize = 8;

/// What the normalization's per-channel coefficients are made of besides the
/// moments: the input's dtype and the layer's affine parameters. Given to
/// [`BatchMoments::apply_with_coefficients`](super::BatchMoments::apply_with_coefficients)
/// or [`Moments::running_with_coefficients`](super::Moments::running_with_coefficients),
/// it makes them compute, with the moments, the `(C, 8)` tensor the CUDA
/// forward's element-wise pass reads per channel (f64 for f64 inputs, else
/// f32). [`BatchNormOp`](super::BatchNormOp) and
/// [`FusedRelu`](super::FusedRelu) take it as `coefficients` and then skip
/// their own coefficient launch on a GPU (the CPU path computes its own).
#[derive(Debug, Clone)]
pub struct ForwardCoefficients {
    /// The dtype of the input the coefficients normalize.
    pub input: DType,
    /// The layer's weight, `(C)` (`None`: 1).
    pub weight: Option<Tensor>,
    /// The layer's bias, `(C)` (`None`: 0).
    pub bias: Option<Tensor>,
}

impl ForwardCoefficients {
    /// The coefficients' dtype for inputs of `input`: the element-wise
    /// passes' accumulator, f64 for f64 and f32 for f32, f16 and bf16.
    pub fn dtype(input: DType) -> Result<DType> {
        match input {
            DType::F64 => Ok(DType::F64),
            DType::F32 | DType::F16 | DType::BF16 => Ok(DType::F32),
            other => Err(unsupported_dtype(
                "sync-batch-norm-coefficients",
                "input",
                other,
            )),
        }
    }

    /// Checks the parameters against `c` channels on `device`, and returns
    /// an uninitialized `(C, 8)` tensor for the op to fill.
    ///
    /// # Safety
    /// The caller's op must write every element before the tensor is read.
    pub(crate) unsafe fn alloc(&self, c: usize, device: &Device, op: &str) -> Result<Tensor> {
        let dtype = Self::dtype(self.input)?;
        for (what, p) in [("weight", &self.weight), ("bias", &self.bias)] {
            if let Some(p) = p {
                if p.elem_count() != c || !p.dtype().is_float() {
                    candle::bail!(
                        "{op}: expected a float {what} of {c} elements for the coefficients, got {:?} {:?}",
                        p.dtype(),
                        p.dims()
                    )
                }
                if !p.device().same_device(device) {
                    candle::bail!(
                        "{op}: the coefficients' {what} is on {:?}, not on {:?}",
                        p.device().location(),
                        device.location()
                    )
                }
            }
        }
        Tensor::empty((c, COEFFICIENTS_PER_CHANNEL), dtype, device)
    }

    /// [`Self::cpu_values`] of a moments op's CPU output.
    pub(crate) fn cpu_values_of(
        &self,
        moments: &CpuStorage,
        shape: &candle::Shape,
        op: &str,
    ) -> Result<CpuStorage> {
        self.cpu_values(&super::cpu_values_f64(
            moments,
            &candle::Layout::contiguous(shape),
            op,
        )?)
    }

    /// The coefficients on the CPU from the `(3, C)` f64 moments, as the
    /// CUDA kernels compute them (f64, then each value rounded once).
    pub(crate) fn cpu_values(&self, moments: &[f64]) -> Result<CpuStorage> {
        let c_n = moments.len() / 3;
        let w = match &self.weight {
            Some(w) => host_f64(w)?,
            None => vec![1.0; c_n],
        };
        let b = match &self.bias {
            Some(b) => host_f64(b)?,
            None => vec![0.0; c_n],
        };
        let per_channel = |c: usize| {
            let mean = moments[c];
            [mean, moments[c_n + c] * w[c], b[c]]
        };
        Ok(match Self::dtype(self.input)? {
            DType::F64 => CpuStorage::F64(
                (0..c_n)
                    .flat_map(|c| {
                        let [mean, scale, shift] = per_channel(c);
                        // As the kernel: lo = mean − hi (0, or NaN for ±∞ and NaN).
                        let hi = mean;
                        [hi, mean - hi, scale, shift, 0.0, 0.0, 0.0, 0.0]
                    })
                    .collect(),
            ),
            _ => CpuStorage::F32(
                (0..c_n)
                    .flat_map(|c| {
                        let [mean, scale, shift] = per_channel(c);
                        let hi = mean as f32;
                        let lo = (mean - hi as f64) as f32;
                        [hi, lo, scale as f32, shift as f32, 0.0, 0.0, 0.0, 0.0]
                    })
                    .collect(),
            ),
        })
    }
}

/// Checks coefficients handed to an op for an input of `input` dtype with
/// `c` channels: `(C, 8)` in the accumulator dtype, contiguous from the
/// start of its storage (the kernels read it from there in 16-byte loads).
#[cfg(feature = "cuda")]
pub(crate) fn check_coefficients(t: &Tensor, c: usize, input: DType, op: &str) -> Result<()> {
    let dtype = ForwardCoefficients::dtype(input)?;
    let l = t.layout();
    if t.dims() != [c, COEFFICIENTS_PER_CHANNEL]
        || t.dtype() != dtype
        || !l.is_contiguous()
        || l.start_offset() != 0
    {
        candle::bail!(
            "{op}: expected coefficients of shape [{c}, {COEFFICIENTS_PER_CHANNEL}] in {dtype:?}, contiguous from the start of their storage (as BatchMoments::apply_with_coefficients makes them), got {:?} {:?} with strides {:?} from offset {}",
            t.dtype(),
            t.dims(),
            l.stride(),
            l.start_offset()
        )
    }
    Ok(())
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    //! The coefficient arguments of the moments kernels.

    use super::ForwardCoefficients;
    use crate::cuda::args;
    use crate::cuda::launch::{self as l, Small};
    use candle::cuda_backend::cudarc::driver::{CudaSlice, LaunchArgs, PushKernelArg};
    use candle::{CudaDevice, CudaStorage, DType, Result, Tensor};

    /// The forward's coefficients on the GPU: made by the coefficient
    /// kernel for this launch, or handed over (computed with the moments).
    pub(crate) enum Coef<'a> {
        /// `bn_coef_normalize_*`'s output.
        Made(CudaSlice<u8>),
        /// A coefficient tensor, read-locked.
        Given(Small<'a>),
    }

    impl<'a> Coef<'a> {
        /// `given` (checked against `c` channels of `input`), or the
        /// coefficients `make` computes.
        pub(crate) fn given_or(
            given: Option<&'a Tensor>,
            dev: &CudaDevice,
            input: DType,
            c: usize,
            op: &str,
            make: impl FnOnce() -> Result<CudaSlice<u8>>,
        ) -> Result<Self> {
            match given {
                Some(t) => {
                    super::check_coefficients(t, c, input, op)?;
                    Ok(Self::Given(Small::new(t, dev, "coefficients")?))
                }
                None => Ok(Self::Made(make()?)),
            }
        }

        /// Pushes the coefficients' device pointer (`const A*`).
        pub(crate) fn push(&'a self, args: &mut LaunchArgs<'a>) -> Result<()> {
            match self {
                Self::Made(s) => {
                    args.arg(s);
                }
                Self::Given(s) => l::push_storage(args, s.storage())?,
            }
            Ok(())
        }
    }

    /// The weight and bias of a coefficient request, read-locked on the GPU.
    pub(crate) struct Params<'a> {
        weight: Option<(Small<'a>, l::Vec1)>,
        bias: Option<(Small<'a>, l::Vec1)>,
    }

    impl<'a> Params<'a> {
        /// Locks the parameters of `coef` (for `c` channels) on `dev`.
        pub(crate) fn new(
            coef: &'a ForwardCoefficients,
            dev: &CudaDevice,
            c: usize,
        ) -> Result<Self> {
            let lock = |t: &'a Option<candle::Tensor>, what: &str| -> Result<_> {
                Ok(match t {
                    Some(t) => {
                        let s = Small::new(t, dev, what)?;
                        let v = s.vec1(c, what)?;
                        Some((s, v))
                    }
                    None => None,
                })
            };
            Ok(Self {
                weight: lock(&coef.weight, "weight")?,
                bias: lock(&coef.bias, "bias")?,
            })
        }
    }

    /// Pushes `w, wv, bias, bv, coef, coef_dt` (see `write_forward_coef_dyn`
    /// in coef.cuh): the parameters and the coefficient storage, or null
    /// pointers and absent views without coefficients.
    pub(crate) fn push<'a>(
        args: &mut LaunchArgs<'a>,
        request: Option<(&'a Params<'a>, &'a mut CudaStorage)>,
        coef_dt: &'a i32,
    ) -> Result<()> {
        static ABSENT: l::Vec1 = l::Vec1::ABSENT;
        let Some((params, coef)) = request else {
            args.arg(&l::NULL)
                .arg(&ABSENT)
                .arg(&l::NULL)
                .arg(&ABSENT)
                .arg(&l::NULL)
                .arg(coef_dt);
            return Ok(());
        };
        for p in [&params.weight, &params.bias] {
            match p {
                Some((s, v)) => {
                    l::push_storage(args, s.storage())?;
                    args.arg(v);
                }
                None => {
                    args.arg(&l::NULL).arg(&ABSENT);
                }
            }
        }
        l::push_storage_mut(args, coef)?;
        args.arg(coef_dt);
        Ok(())
    }

    /// The kernels' code for the coefficient dtype of inputs of `input`.
    pub(crate) fn dtype_code(input: candle::DType) -> Result<i32> {
        args::dtype_code(ForwardCoefficients::dtype(input)?, "coefficients")
    }
}
