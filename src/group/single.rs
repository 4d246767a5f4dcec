//! The group of one rank.

use super::Backend;
use candle::{Result, Tensor};

/// The backend of [`ProcessGroup::single`](super::ProcessGroup::single): one rank,
/// collectives are the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleBackend;

impl Backend for SingleBackend {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.clone())
    }

    fn broadcast(&self, tensor: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(tensor.clone())
    }

    fn name(&self) -> &str {
        "single"
    }
}
