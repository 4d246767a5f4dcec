//! One benchmark case (a layer over one shape and dtype on a device, with
//! every tensor its measurements read made up front) and what one timed call
//! of each measurement runs: shared by the table (`bench_one`) and by
//! `--serve`, so that both time the same work.

use anyhow::{bail, Result};
use candle::{DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, ModuleT, VarBuilder, VarMap};
use candle_syncbn::ops::{
    BatchMoments, BatchStats, ForwardCoefficients, FusedRelu, GradStats, InputGrad, Moments,
    ReluGrad,
};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use rayon::prelude::*;
use std::any::Any;
use std::time::Instant;

/// What one timed call runs. Every call returns what it made (outputs,
/// gradients), and the timing drops it after the device synchronized: a
/// training loop pays for freeing them too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// A copy of the input's bytes: on the CPU in parallel over rayon's pool
    /// between two buffers that are already mapped (the memory's bandwidth,
    /// without page faults), on CUDA candle's device copy.
    Copy,
    /// A training forward.
    Fwd,
    /// `backward()` of a training forward made once, up front.
    Bwd,
    /// Our backward kernels alone: gradient sums, (world-size-1) collective,
    /// input gradient.
    BwdOps,
    /// A training step: forward, then `backward()` through candle's autograd
    /// (seeded with ones).
    Step,
    /// An eval forward.
    Eval,
    /// candle's gradient bookkeeping for one op of this shape, as
    /// `Tensor::backward` does it: the `ones_like` seed, and `zeros_like` +
    /// `add` to accumulate the input's gradient.
    Bookkeeping,
    /// candle-nn's BatchNorm step.
    NnStep,
    /// `forward_relu_t` + `backward()`.
    ReluStep,
    /// Our backward kernels alone after the fused ReLU, as `forward_relu_t`
    /// runs them: the mask recomputed inside the gradient sums and the input
    /// gradient.
    ReluBwdOps,
    /// The same with the mask as a pass of its own first (`ReluGrad`, reading
    /// the output), as `forward_add_relu_t` runs them.
    ReluBwdOpsMaskPass,
    /// `forward_t`, candle's `relu`, `backward()`.
    BnThenReluStep,
    /// candle-nn's BatchNorm, `relu`, `backward()`.
    NnReluStep,
    /// `forward_add_relu_t(x, z)` + `backward()` (z a variable too).
    AddReluStep,
    /// `forward_t`, `+ z`, `relu`, `backward()`.
    BnAddReluStep,
    /// candle-nn's BatchNorm, `+ z`, `relu`, `backward()`.
    NnAddReluStep,
    /// `forward_composite_t` + `backward()`.
    CompositeStep,
    /// `forward_composite_t` in eval.
    CompositeEval,
}

/// The names of `--serve`'s requests.
const NAMES: [(&str, Work); 18] = [
    ("copy", Work::Copy),
    ("fwd", Work::Fwd),
    ("bwd", Work::Bwd),
    ("bwd_ops", Work::BwdOps),
    ("step", Work::Step),
    ("eval", Work::Eval),
    ("bookkeeping", Work::Bookkeeping),
    ("nn_step", Work::NnStep),
    ("relu_step", Work::ReluStep),
    ("relu_bwd_ops", Work::ReluBwdOps),
    ("relu_bwd_ops_mask_pass", Work::ReluBwdOpsMaskPass),
    ("bn_then_relu_step", Work::BnThenReluStep),
    ("nn_relu_step", Work::NnReluStep),
    ("add_relu_step", Work::AddReluStep),
    ("bn_add_relu_step", Work::BnAddReluStep),
    ("nn_add_relu_step", Work::NnAddReluStep),
    ("composite_step", Work::CompositeStep),
    ("composite_eval", Work::CompositeEval),
];

impl Work {
    /// The measurement named `name` (the names of `--serve`'s requests).
    pub fn parse(name: &str) -> Result<Work> {
        match NAMES.iter().find(|(n, _)| *n == name) {
            Some(&(_, work)) => Ok(work),
            None => bail!("unknown measurement {name}"),
        }
    }
}

/// Which optional parts a case makes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Parts {
    /// candle-nn's BatchNorm (`Nn*`).
    pub nn: bool,
    /// The batch norm + ReLU (+ residual) steps (`*Relu*`).
    pub relu: bool,
}

/// A residual and what the ReLU measurements read.
struct ReluParts {
    z: Var,
    /// The fused forward's output, detached: what the mask pass reads.
    y_relu: Tensor,
    fused: FusedRelu,
    /// `z` in candle-nn's parameter dtype.
    nn_z: Option<Tensor>,
}

/// One case: our layer and candle-nn's over one input, and every tensor the
/// measurements read, all made up front (so that no measurement leaves a
/// buffer behind that changes how the allocator serves the next one).
pub struct Case {
    dev: Device,
    x: Var,
    bn: SyncBatchNorm,
    /// A training forward's output, for `Bwd`.
    y: Tensor,
    dy: Tensor,
    moments: Tensor,
    group: ProcessGroup,
    dx_stand_in: Tensor,
    /// Source and destination of the CPU copy.
    copy: Option<(Vec<u8>, Vec<u8>)>,
    nn: Option<(BatchNorm, Tensor)>,
    relu: Option<ReluParts>,
    // The layers' variables live as long as the case.
    _varmaps: (VarMap, VarMap),
}

/// Bytes a task of the CPU copy moves.
const COPY_PIECE: usize = 1 << 20;

impl Case {
    /// A layer over `shape` in `dtype` on `dev` (parameters in f32, f64 for
    /// f64 inputs), with a standard-normal input drawn on the host (no cuRAND
    /// needed, so the emulated GPU runs it too).
    pub fn new(dev: &Device, shape: &[usize], dtype: DType, parts: Parts) -> Result<Case> {
        let randn = || -> Result<Var> {
            Ok(Var::from_tensor(
                &Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(dev)?,
            )?)
        };
        let x = randn()?;
        let xt = x.as_tensor();
        let param_dtype = param_dtype(dtype);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, param_dtype, dev);
        let bn = SyncBatchNorm::new(
            shape[1],
            SyncBatchNormConfig::default(),
            vb,
            ProcessGroup::single(),
        )?;
        let y = bn.forward_t(xt, true)?;
        let dx_stand_in = xt.ones_like()?;
        let dy = xt.ones_like()?;
        let sums = xt.apply_op1_no_bwd(&BatchStats { axis: 1 })?;
        // On a GPU the layer computes the forward's coefficients with the
        // moments, and a fused ReLU's backward reads them.
        let (moments, coefficients) = if dev.is_cuda() {
            let request = ForwardCoefficients {
                input: dtype,
                weight: None,
                bias: None,
            };
            let (m, c) = BatchMoments::apply_with_coefficients(&sums, 1e-5, None, &request)?;
            (m, Some(c))
        } else {
            (sums.apply_op1_no_bwd(&Moments { eps: 1e-5 })?, None)
        };
        let copy = if dev.is_cpu() {
            let bytes = xt.elem_count() * dtype.size_in_bytes();
            Some((vec![1u8; bytes], vec![2u8; bytes]))
        } else {
            None
        };
        let nn_map = VarMap::new();
        let nn = if parts.nn {
            let nn_bn = candle_nn::batch_norm(
                shape[1],
                1e-5,
                VarBuilder::from_varmap(&nn_map, param_dtype, dev),
            )?;
            Some((nn_bn, xt.to_dtype(param_dtype)?))
        } else {
            None
        };
        let relu = if parts.relu {
            let z = randn()?;
            let nn_z = if parts.nn {
                Some(z.as_tensor().to_dtype(param_dtype)?)
            } else {
                None
            };
            Some(ReluParts {
                y_relu: bn.forward_relu_t(xt, true)?.detach(),
                fused: FusedRelu {
                    coefficients,
                    ..FusedRelu::default()
                },
                z,
                nn_z,
            })
        } else {
            None
        };
        Ok(Case {
            dev: dev.clone(),
            x,
            bn,
            y,
            dy,
            moments,
            group: ProcessGroup::single(),
            dx_stand_in,
            copy,
            nn,
            relu,
            _varmaps: (varmap, nn_map),
        })
    }

    /// The device the case runs on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The input's bytes.
    pub fn bytes(&self) -> usize {
        self.x.elem_count() * self.x.dtype().size_in_bytes()
    }

    /// One call of `work`; the caller times it and drops what it returns.
    pub fn run(&mut self, work: Work) -> Result<Box<dyn Any>> {
        let xt = self.x.as_tensor();
        let bn = &self.bn;
        let out: Box<dyn Any> = match work {
            Work::Copy => match &mut self.copy {
                Some((src, dst)) => {
                    dst.par_chunks_mut(COPY_PIECE)
                        .zip(src.par_chunks(COPY_PIECE))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                    Box::new(())
                }
                None => Box::new(xt.copy()?),
            },
            Work::Fwd => Box::new(bn.forward_t(xt, true)?),
            Work::Bwd => Box::new(self.y.backward()?),
            Work::BwdOps => Box::new(self.bwd_ops(None, &self.dy)?),
            Work::Step => Box::new(bn.forward_t(xt, true)?.backward()?),
            Work::Eval => Box::new(bn.forward_t(xt, false)?),
            Work::Bookkeeping => {
                let seed = xt.ones_like()?.contiguous()?;
                let accumulated = xt.zeros_like()?.add(&self.dx_stand_in)?;
                Box::new((seed, accumulated))
            }
            Work::NnStep => {
                let (nn_bn, nn_x) = self.nn_parts()?;
                Box::new(nn_bn.forward_t(nn_x, true)?.backward()?)
            }
            Work::ReluStep => Box::new(bn.forward_relu_t(xt, true)?.backward()?),
            Work::ReluBwdOps => {
                let fused = self.relu_parts()?.fused.clone();
                Box::new(self.bwd_ops(Some(fused), &self.dy)?)
            }
            Work::ReluBwdOpsMaskPass => {
                let y_relu = &self.relu_parts()?.y_relu;
                let masked = self.dy.apply_op2_no_bwd(y_relu, &ReluGrad { axis: 1 })?;
                Box::new(self.bwd_ops(None, &masked)?)
            }
            Work::BnThenReluStep => Box::new(bn.forward_t(xt, true)?.relu()?.backward()?),
            Work::NnReluStep => {
                let (nn_bn, nn_x) = self.nn_parts()?;
                Box::new(nn_bn.forward_t(nn_x, true)?.relu()?.backward()?)
            }
            Work::AddReluStep => {
                let zt = self.relu_parts()?.z.as_tensor();
                Box::new(bn.forward_add_relu_t(xt, zt, true)?.backward()?)
            }
            Work::BnAddReluStep => {
                let zt = self.relu_parts()?.z.as_tensor();
                Box::new((bn.forward_t(xt, true)? + zt)?.relu()?.backward()?)
            }
            Work::NnAddReluStep => {
                let (nn_bn, nn_x) = self.nn_parts()?;
                let Some(nn_z) = &self.relu_parts()?.nn_z else {
                    bail!("this case has no residual for candle-nn")
                };
                Box::new((nn_bn.forward_t(nn_x, true)? + nn_z)?.relu()?.backward()?)
            }
            Work::CompositeStep => {
                Box::new(bn.forward_composite_t(xt, None, false, true)?.backward()?)
            }
            Work::CompositeEval => Box::new(bn.forward_composite_t(xt, None, false, false)?),
        };
        Ok(out)
    }

    /// Our backward kernels on `dy`: gradient sums (after a fused ReLU's mask
    /// when `relu` is given), the collective, the input gradient.
    fn bwd_ops(&self, relu: Option<FusedRelu>, dy: &Tensor) -> Result<Tensor> {
        let xt = self.x.as_tensor();
        let op = GradStats {
            axis: 1,
            moments: self.moments.clone(),
            relu: relu.clone(),
        };
        let global = self.group.all_reduce_sum(&dy.apply_op2_no_bwd(xt, &op)?)?;
        let op = InputGrad {
            axis: 1,
            moments: self.moments.clone(),
            grad_sums: Some(global),
            weight: None,
            relu,
        };
        Ok(dy.apply_op2_no_bwd(xt, &op)?)
    }

    fn nn_parts(&self) -> Result<(&BatchNorm, &Tensor)> {
        match &self.nn {
            Some((nn_bn, nn_x)) => Ok((nn_bn, nn_x)),
            None => bail!("this case was made without candle-nn's BatchNorm"),
        }
    }

    fn relu_parts(&self) -> Result<&ReluParts> {
        match &self.relu {
            Some(parts) => Ok(parts),
            None => bail!("this case was made without the ReLU steps"),
        }
    }
}

/// A shape written like `32x64x56x56` (2 to 5 dims).
pub fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.trim().parse())
        .collect::<Result<_, _>>()?;
    if !(2..=5).contains(&dims.len()) {
        bail!("shape {s}: expected 2 to 5 dims")
    }
    Ok(dims)
}

/// A dtype among f32, f64, f16, bf16.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.trim() {
        "f32" => DType::F32,
        "f64" => DType::F64,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype {other}"),
    })
}

/// The parameters' dtype for inputs of `dtype`: f32, f64 for f64 inputs (as
/// under autocast).
pub fn param_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Seconds of each of `n` timed calls of `f`, in order, after `warm` untimed
/// ones. A call's timing ends after the device synchronized and what the call
/// returned was dropped.
pub fn timed_calls<T>(
    dev: &Device,
    warm: usize,
    n: usize,
    mut f: impl FnMut() -> Result<T>,
) -> Result<Vec<f64>> {
    for _ in 0..warm {
        drop(f()?);
    }
    dev.synchronize()?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        drop(out);
        samples.push(t.elapsed().as_secs_f64());
    }
    Ok(samples)
}
