//! [`keep_freed_memory`]: the memory policy that training with candle wants,
//! on the CPU and on CUDA devices behind one call.

use candle::{Device, Result};

/// Makes the allocator behind `device` keep freed memory for reuse instead
/// of returning it to the system, so that each training step reuses the
/// previous step's activation and gradient buffers instead of faulting or
/// mapping them in again (candle allocates a fresh buffer for every op
/// output and gradient). Results do not change; the process keeps its peak
/// memory, as with PyTorch's caching allocator.
///
/// - CPU: glibc's `malloc` keeps freed memory (no `mmap` per large buffer,
///   no trimming, one arena). It applies to the whole process: call it once,
///   before the model is built and before any thread is started (rank
///   threads, rayon's pool). The same policy without code:
///   `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615
///   MALLOC_TOP_PAD_=67108864 MALLOC_ARENA_MAX=1`.
/// - CUDA (feature `cuda`): the device's current memory pool, which candle
///   allocates from, gets a release threshold of `u64::MAX`, so freed memory
///   stays in the pool across synchronizations. Call it once per process and
///   GPU, after opening the device; other processes on the GPU cannot use
///   that memory (the driver still trims the pool when an allocation would
///   fail).
///
/// Returns `Ok(true)` when the policy was applied and `Ok(false)` where there
/// is nothing to apply it to: a C library other than glibc, CUDA devices
/// without stream-ordered allocation, CUDA without the `cuda` feature, and
/// other devices (Metal). A CUDA driver error is returned as such.
///
/// ```
/// let kept = candle_syncbn::keep_freed_memory(&candle::Device::Cpu)?;
/// assert_eq!(kept, cfg!(all(target_os = "linux", target_env = "gnu")));
/// # Ok::<(), candle::Error>(())
/// ```
pub fn keep_freed_memory(device: &Device) -> Result<bool> {
    match device {
        Device::Cpu => Ok(crate::cpu::keep_freed_host_memory()),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::cuda::memory::keep_freed_memory(device),
        _ => Ok(false),
    }
}
