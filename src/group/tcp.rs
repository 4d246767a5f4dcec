//! The TCP group: one process per rank (on one or several machines), talking
//! over the authenticated star of connections made by the rendezvous (see the
//! `star` and `rendezvous` modules) and, for large all-reduces, over a ring of direct
//! rank-to-rank connections (see the `ring` module).
//!
//! An all-reduce smaller than [`StoreOptions::ring_min_bytes`] (the layers'
//! statistics) sends every rank's values to rank 0, which sums them in f64 in
//! rank order (f32 inputs are rounded once, at the end) and sends the sum
//! back: one round trip. A larger one (gradients) runs as a ring
//! reduce-scatter + all-gather, summed in the tensor's own dtype in a fixed
//! order. Either way the result is the same on every rank, bit for bit, and
//! bitwise reproducible run to run. Tensors on any device work; they are
//! staged through host memory (so several processes may share one GPU, e.g.
//! in tests).

use super::rendezvous::Rendezvous;
use super::ring::{Ring, RingElem};
use super::star::Star;
use super::wire::{dtype_code, io_error_kind, Call, Op, FLAG_META_ONLY};
use super::StoreOptions;
use super::{Backend, CallTag};
use crate::error::{bail_kind, ErrorKind, Failure};
use candle::{DType, Device, Result, Storage, Tensor};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

/// The options of the TCP group (timeouts, message size bound).
pub type TcpOptions = StoreOptions;

/// The backend of [`ProcessGroup::tcp`](super::ProcessGroup::tcp).
pub struct TcpBackend {
    rank: usize,
    world_size: usize,
    links: Mutex<Links>,
}

/// The connections of one rank: the star, and the ring while it works.
struct Links {
    star: Star,
    ring: Option<Ring>,
}

impl fmt::Debug for TcpBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpBackend")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

/// Copies a tensor's values (any layout, any device) to little-endian bytes.
pub(crate) fn tensor_to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    macro_rules! bytes {
        ($ty:ty) => {
            t.to_vec1::<$ty>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
    }
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::U32 => bytes!(u32),
        DType::I16 => bytes!(i16),
        DType::I32 => bytes!(i32),
        DType::I64 => bytes!(i64),
        DType::BF16 => bytes!(half::bf16),
        DType::F16 => bytes!(half::f16),
        DType::F32 => bytes!(f32),
        DType::F64 => bytes!(f64),
        d => candle::bail!("process group: tensors of dtype {d:?} cannot be communicated"),
    })
}

/// The inverse of [`tensor_to_bytes`]: a tensor of `dtype` and `shape` on `device`.
pub(crate) fn tensor_from_bytes(
    bytes: &[u8],
    dtype: DType,
    shape: &candle::Shape,
    device: &Device,
) -> Result<Tensor> {
    macro_rules! from {
        ($ty:ty) => {{
            let n = std::mem::size_of::<$ty>();
            let v: Vec<$ty> = bytes
                .chunks_exact(n)
                .map(|c| <$ty>::from_le_bytes(c.try_into().expect("chunk size")))
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)?
        }};
    }
    let t = match dtype {
        DType::U8 => Tensor::from_vec(bytes.to_vec(), shape, &Device::Cpu)?,
        DType::U32 => from!(u32),
        DType::I16 => from!(i16),
        DType::I32 => from!(i32),
        DType::I64 => from!(i64),
        DType::BF16 => from!(half::bf16),
        DType::F16 => from!(half::f16),
        DType::F32 => from!(f32),
        DType::F64 => from!(f64),
        d => candle::bail!("process group: tensors of dtype {d:?} cannot be communicated"),
    };
    t.to_device(device)
}

/// Sums the payloads (little-endian values of a float dtype) in rank order,
/// in f64, rounded once to the dtype at the end.
pub(crate) fn sum_in_rank_order(
    payloads: &[Vec<u8>],
    dtype: DType,
) -> std::result::Result<Vec<u8>, String> {
    let n = payloads[0].len() / dtype.size_in_bytes();
    // -0.0 is the identity of IEEE addition (+0.0 is not: +0.0 + -0.0 = +0.0),
    // so a sum of negative zeros stays -0.0, as a sum of the values alone.
    let mut acc = vec![-0f64; n];
    for p in payloads {
        match dtype {
            DType::F32 => {
                for (a, c) in acc.iter_mut().zip(p.chunks_exact(4)) {
                    *a += f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")));
                }
            }
            DType::F64 => {
                for (a, c) in acc.iter_mut().zip(p.chunks_exact(8)) {
                    *a += f64::from_le_bytes(c.try_into().expect("8 bytes"));
                }
            }
            DType::BF16 => {
                for (a, c) in acc.iter_mut().zip(p.chunks_exact(2)) {
                    *a += half::bf16::from_le_bytes([c[0], c[1]]).to_f64();
                }
            }
            DType::F16 => {
                for (a, c) in acc.iter_mut().zip(p.chunks_exact(2)) {
                    *a += half::f16::from_le_bytes([c[0], c[1]]).to_f64();
                }
            }
            d => return Err(format!("internal error: sum of {d:?}")),
        }
    }
    Ok(match dtype {
        DType::F32 => acc.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(),
        DType::BF16 => acc
            .iter()
            .flat_map(|v| half::bf16::from_f64(*v).to_le_bytes())
            .collect(),
        DType::F16 => acc
            .iter()
            .flat_map(|v| half::f16::from_f64(*v).to_le_bytes())
            .collect(),
        _ => acc.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

/// The sum of `tensor` over the ring (see the `ring` module): the star's
/// check that every rank makes this call (`call`, `tag`), then the ring,
/// reading the values where the tensor keeps them (a contiguous CPU tensor;
/// others are copied to the host first) and writing the sum into a new
/// tensor. A ring failure closes the ring and poisons the star, so that every
/// later call fails at once.
fn ring_all_reduce<T: RingElem>(
    links: &mut Links,
    tensor: &Tensor,
    call: Call,
    tag: CallTag,
) -> Result<Tensor> {
    let check = Call {
        flags: FLAG_META_ONLY,
        ..call
    };
    if let Err(e) = links
        .star
        .exchange_tagged(check, tag, &[], &|_| Ok(Vec::new()))
    {
        links.ring = None;
        return Err(e);
    }
    let ring = links.ring.as_mut().expect("the ring is up");
    let what = match tag {
        CallTag::UNTAGGED => call.to_string(),
        tag => format!("{call} for {tag}"),
    };
    let (storage, layout) = tensor.storage_and_layout();
    let summed = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => {
            ring.all_reduce(&cpu.as_slice::<T>()?[start..end], tag, &what)
        }
        _ => {
            drop(storage);
            let values = tensor.flatten_all()?.to_vec1::<T>()?;
            ring.all_reduce(&values, tag, &what)
        }
    };
    match summed {
        Ok(values) => {
            Tensor::from_vec(values, tensor.shape(), &Device::Cpu)?.to_device(tensor.device())
        }
        Err(m) => {
            links.ring = None;
            Err(links.star.fail_with(Failure {
                kind: io_error_kind(&m),
                msg: format!("tcp group: {m}"),
            }))
        }
    }
}

impl TcpBackend {
    /// Joins the group described by `rv` (blocks until every rank has joined,
    /// or fails after `options.rendezvous_timeout`).
    pub fn connect(rv: &Rendezvous, options: TcpOptions) -> Result<Self> {
        let mut star = Star::connect(rv, options)?;
        let ring = if rv.world_size > 1 {
            let token = rv.token.clone().unwrap_or_default().into_bytes();
            Ring::connect(&mut star, rv.rank, rv.world_size, &token)?
        } else {
            None
        };
        Ok(Self {
            rank: rv.rank,
            world_size: rv.world_size,
            links: Mutex::new(Links { star, ring }),
        })
    }

    fn links(&self) -> MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn call(op: Op, t: &Tensor, root: usize) -> Result<Call> {
        let code = dtype_code(t.dtype());
        if code == 255 {
            bail_kind!(
                ErrorKind::BadInput,
                "tcp group: tensors of dtype {:?} cannot be communicated",
                t.dtype()
            )
        }
        Ok(Call {
            op,
            dtype: code,
            count: t.elem_count() as u64,
            root: root as u32,
            flags: 0,
        })
    }
}

impl Backend for TcpBackend {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        self.all_reduce_sum_tagged(tensor, CallTag::UNTAGGED)
    }

    fn all_reduce_sum_tagged(&self, tensor: &Tensor, tag: CallTag) -> Result<Tensor> {
        let dtype = tensor.dtype();
        if !dtype.is_float() || dtype_code(dtype) == 255 {
            bail_kind!(
                ErrorKind::BadInput,
                "tcp group: all_reduce_sum expects an f32, f64, bf16 or f16 tensor, got {dtype:?}"
            )
        }
        let call = Self::call(Op::AllReduceSum, tensor, 0)?;
        let mut links = self.links();
        let bytes = (tensor.elem_count() * dtype.size_in_bytes()) as u64;
        if links.ring.as_ref().is_some_and(|r| bytes >= r.min_bytes()) {
            let links = &mut *links;
            return match dtype {
                DType::F32 => ring_all_reduce::<f32>(links, tensor, call, tag),
                DType::F64 => ring_all_reduce::<f64>(links, tensor, call, tag),
                DType::BF16 => ring_all_reduce::<half::bf16>(links, tensor, call, tag),
                _ => ring_all_reduce::<half::f16>(links, tensor, call, tag),
            };
        }
        let bytes = tensor_to_bytes(tensor)?;
        let reduce = |p: &[Vec<u8>]| sum_in_rank_order(p, dtype);
        let out = links.star.exchange_tagged(call, tag, &bytes, &reduce)?;
        tensor_from_bytes(&out, dtype, tensor.shape(), tensor.device())
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        let call = Self::call(Op::Broadcast, tensor, root)?;
        let bytes = if self.rank == root {
            tensor_to_bytes(tensor)?
        } else {
            Vec::new()
        };
        let reduce = |p: &[Vec<u8>]| Ok(p[root].clone());
        let out = self.links().star.exchange(call, &bytes, &reduce)?;
        tensor_from_bytes(&out, tensor.dtype(), tensor.shape(), tensor.device())
    }

    fn barrier(&self) -> Result<()> {
        let call = Call {
            op: Op::Barrier,
            dtype: 0,
            count: 0,
            root: 0,
            flags: 0,
        };
        self.links().star.exchange(call, &[], &|_| Ok(Vec::new()))?;
        Ok(())
    }

    fn name(&self) -> &str {
        "tcp"
    }
}
