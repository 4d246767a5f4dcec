//! Gradient averaging for data-parallel training: [`GradientAverager`], which
//! agrees once with the other ranks on which variables have gradients and
//! then averages without a host synchronization, and [`AverageOptions`].

use crate::grad_pack::{buckets, pack, sorted_vars, unflatten, Part, DEFAULT_BUCKET_BYTES};
use crate::ProcessGroup;
use candle::backprop::GradStore;
use candle::{DType, Device, Result, Tensor, TensorId, Var};
use candle_nn::VarMap;
use std::collections::HashSet;
use std::ops::Range;

/// How gradients are averaged ([`GradientAverager`],
/// [`average_gradients_with`](crate::data_parallel::average_gradients_with)).
///
/// Non-exhaustive, so that a future option is not a breaking change: start
/// from [`Default`] and change what differs with the `with_*` setters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AverageOptions {
    /// The largest bucket, in bytes of the reduced dtype (default 25 MiB, as
    /// PyTorch's DDP); a larger gradient gets a bucket of its own.
    pub bucket_bytes: usize,
    /// Reduce bf16 and f16 gradients in their own dtype (half the bytes on
    /// the wire, as PyTorch's DDP does) instead of f32 (the default: each
    /// rank's gradient rounded once to f32, summed in f32, rounded once back).
    pub half_in_own_dtype: bool,
}

impl AverageOptions {
    /// With [`bucket_bytes`](Self::bucket_bytes) set to `bytes`.
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = bytes;
        self
    }

    /// With [`half_in_own_dtype`](Self::half_in_own_dtype) set to `own`.
    pub fn with_half_in_own_dtype(mut self, own: bool) -> Self {
        self.half_in_own_dtype = own;
        self
    }
}

impl Default for AverageOptions {
    fn default() -> Self {
        Self {
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            half_in_own_dtype: false,
        }
    }
}

/// Averages the gradients of a model over the ranks of a group, step after
/// step, without a host synchronization after the first step.
///
/// Create one per model and group, before the training loop, and call
/// [`GradientAverager::average`] after each backward (every rank, every
/// step):
///
/// - **The first call** (and the first after [`GradientAverager::reset`])
///   agrees with the other ranks on the set C of floating-point variables
///   that have a gradient on at least one rank: one all-reduce of a flag per
///   variable, whose result the host reads (one device-to-host copy; the
///   only host synchronization the averager ever makes). It remembers C and
///   its buckets.
/// - **Every later call** communicates nothing but the buckets of C and reads
///   nothing back: a variable of C without a gradient on this rank counts as
///   a zero gradient here, so forward, backward, averaging and an optimizer
///   step enqueue their work on the GPU without waiting for it (with NCCL).
///
/// The result is exactly that of
/// [`average_gradients`](crate::data_parallel::average_gradients) (which
/// agrees on every call) as long as the set of variables with gradients on
/// some rank stays C. When it changes:
///
/// - a variable outside C with a gradient on this rank (a branch no rank took
///   at the agreement, a variable added to the `VarMap` since) makes
///   [`GradientAverager::average`] fail on this rank, naming the variable,
///   before any collective of the call; the other ranks then fail within the
///   group's timeout (sooner when this rank's process ends). It is never
///   silently dropped.
/// - a variable of C without a gradient on any rank in a step gets a zero
///   gradient (`average_gradients` would leave it without one). For SGD that
///   is the same update; an optimizer with weight decay or momentum (AdamW)
///   still moves such a variable.
///
/// So when the set can change from step to step, call
/// [`GradientAverager::reset`] on every rank in the same step (the next call
/// agrees again), or use `average_gradients`, which pays the agreement's
/// synchronization on every call.
///
/// This is PyTorch DDP's `static_graph=True`: the set of used parameters is
/// learnt at the first iteration and assumed fixed. DDP's default
/// (`find_unused_parameters=False`) expects every parameter to get a
/// gradient on every rank and errs when one does not; its
/// `find_unused_parameters=True` exchanges a used-parameter bitmap and reads
/// it on the host every iteration, as `average_gradients` does.
///
/// The buckets (see [`AverageOptions`]): the variables of C in name order,
/// split into runs of one reduced dtype of at most
/// [`AverageOptions::bucket_bytes`]; per bucket, one pack of the gradients
/// into a flat tensor in the reduced dtype, one all-reduce, and views of
/// the result handed back to the `GradStore` (converted back for
/// half-precision variables reduced in f32). The division by the world size
/// costs no pass of its own: on the CPU it is part of the pack, on a GPU it
/// is part of the reduction ([`ProcessGroup::all_reduce_mean`]: NCCL's
/// `ncclAvg`). One collective per bucket per call, plus the agreement's;
/// one bucket of extra memory at a time besides what the backend stages.
#[derive(Debug)]
pub struct GradientAverager {
    group: ProcessGroup,
    options: AverageOptions,
    plan: Option<Plan>,
}

/// What the ranks agreed on.
#[derive(Debug)]
struct Plan {
    /// C: the floating-point variables with a gradient on some rank at the
    /// agreement, in name order.
    vars: Vec<(String, Var)>,
    /// Their ids, to find gradients outside C.
    ids: HashSet<TensorId>,
    /// The buckets over `vars`, with the dtype each is reduced in.
    buckets: Vec<(Range<usize>, DType)>,
    /// The device of the variables.
    device: Device,
}

impl GradientAverager {
    /// An averager over `group` that agrees on the set of variables with
    /// gradients at its first [`GradientAverager::average`].
    pub fn new(group: &ProcessGroup, options: AverageOptions) -> Self {
        Self {
            group: group.clone(),
            options,
            plan: None,
        }
    }

    /// Forgets the agreed set of variables: the next
    /// [`GradientAverager::average`] agrees again (one host synchronization).
    /// Call it on every rank before the same step.
    pub fn reset(&mut self) {
        self.plan = None;
    }

    /// Replaces each gradient in `grads` of a floating-point variable of
    /// `varmap` by its average over the ranks (see [`GradientAverager`] for
    /// which variables, and when it fails). A collective: every rank calls it
    /// with the same variables.
    pub fn average(&mut self, varmap: &VarMap, grads: &mut GradStore) -> Result<()> {
        let world = self.group.world_size();
        if world == 1 {
            return Ok(());
        }
        if let Some(plan) = &self.plan {
            if let Some(name) = first_outside(varmap, grads, &plan.ids) {
                candle::bail!(
                    "average_gradients (rank {} of {world}): the variable '{name}' has a gradient on this rank, but no rank had one when the ranks agreed on the variables to average (the first call, or the first after a reset); call GradientAverager::reset on every rank when the set of variables with gradients changes, or use data_parallel::average_gradients",
                    self.group.rank()
                )
            }
        } else {
            self.plan = agree(varmap, grads, &self.group, &self.options)?;
        }
        let Some(plan) = &self.plan else {
            // No floating-point variable at all.
            return Ok(());
        };
        for (range, dtype) in &plan.buckets {
            let part = &plan.vars[range.clone()];
            let parts: Vec<Part> = part
                .iter()
                .map(|(name, v)| match grads.get(v) {
                    Some(g) if g.shape() != v.shape() => candle::bail!(
                        "average_gradients (rank {}): the gradient of '{name}' has shape {:?}, the variable {:?}",
                        self.group.rank(),
                        g.dims(),
                        v.dims()
                    ),
                    g => Ok((g, v.elem_count())),
                })
                .collect::<Result<_>>()?;
            let packed = pack(&parts, *dtype, world, &plan.device)?;
            drop(parts);
            let mean = if packed.divided {
                self.group.all_reduce_sum(&packed.flat)?
            } else {
                self.group.all_reduce_mean(&packed.flat)?
            };
            drop(packed);
            let shapes: Vec<&candle::Shape> = part.iter().map(|(_, v)| v.shape()).collect();
            for ((_, var), g) in part.iter().zip(unflatten(&mean, &shapes)?) {
                grads.insert(var.as_tensor(), g.to_dtype(var.dtype())?);
            }
        }
        Ok(())
    }
}

/// The name of a floating-point variable of `varmap` with a gradient in
/// `grads` but not in `agreed`, if any (the first in name order).
fn first_outside(varmap: &VarMap, grads: &GradStore, agreed: &HashSet<TensorId>) -> Option<String> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .filter(|(_, v)| {
            v.dtype().is_float() && !agreed.contains(&v.as_tensor().id()) && grads.get(v).is_some()
        })
        .map(|(k, _)| k.clone())
        .min()
}

/// The agreement: which floating-point variables of `varmap` have a gradient
/// on some rank (one all-reduce of a flag per variable, read on the host),
/// and their buckets; `None` when `varmap` has no floating-point variable.
fn agree(
    varmap: &VarMap,
    grads: &GradStore,
    group: &ProcessGroup,
    options: &AverageOptions,
) -> Result<Option<Plan>> {
    let vars: Vec<(String, Var)> = sorted_vars(varmap)
        .into_iter()
        .filter(|(_, v)| v.dtype().is_float())
        .collect();
    let Some(device) = vars.first().map(|(_, v)| v.device().clone()) else {
        return Ok(None);
    };
    let has: Vec<f32> = vars
        .iter()
        .map(|(_, v)| if grads.get(v).is_some() { 1.0 } else { 0.0 })
        .collect();
    let has = Tensor::from_vec(has, vars.len(), &device)?;
    let has = group.all_reduce_sum(&has)?.to_vec1::<f32>()?;
    let used: Vec<(String, Var)> = vars
        .into_iter()
        .zip(has)
        .filter(|(_, h)| *h > 0.0)
        .map(|(v, _)| v)
        .collect();
    let reduce_dtype = |d: DType| match d {
        DType::F64 => DType::F64,
        DType::BF16 | DType::F16 if options.half_in_own_dtype => d,
        _ => DType::F32,
    };
    let items: Vec<(DType, usize)> = used
        .iter()
        .map(|(_, v)| {
            let d = reduce_dtype(v.dtype());
            (d, v.elem_count() * d.size_in_bytes())
        })
        .collect();
    let buckets = buckets(&items, options.bucket_bytes.max(1))
        .into_iter()
        .map(|r| {
            let dtype = items[r.start].0;
            (r, dtype)
        })
        .collect();
    let ids = used.iter().map(|(_, v)| v.as_tensor().id()).collect();
    Ok(Some(Plan {
        vars: used,
        ids,
        buckets,
        device,
    }))
}
