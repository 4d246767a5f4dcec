//! The allocator policy that CPU training with candle wants.
//!
//! candle allocates a fresh buffer for every op output and, in
//! `Tensor::backward`, two more per op input (a `zeros_like` and the `add` that
//! accumulates the gradient into it). With glibc's default policy, buffers
//! above 32 MiB are `mmap`ed and unmapped on every free, and smaller ones come
//! from a heap that is trimmed back to the system whenever its free top exceeds
//! twice the last such size. A training step frees all its activation-sized
//! buffers at once, so the next step page-faults every one of them again: on
//! the 2-core CI machine a SyncBatchNorm step on (4096, 1024) f32 takes 28 ms
//! that way against 5 ms when freed memory is kept, and candle-nn's BatchNorm
//! pays the same on each of its ops.

/// Makes glibc's `malloc` keep freed memory for reuse instead of returning it
/// to the system: large allocations come from the heap rather than from fresh
/// `mmap`s (`M_MMAP_MAX = 0`), the heap is never trimmed
/// (`M_TRIM_THRESHOLD = -1`) and grows in steps of 64 MiB (`M_TOP_PAD`), and
/// threads started afterwards share that one heap (`M_ARENA_MAX = 1`: the
/// per-thread arenas of glibc cannot hold buffers over 64 MiB and `mmap` them).
///
/// Call it once at the start of a CPU training process, before the model is
/// built and before any thread is started (rank threads, rayon's pool). It
/// applies to the whole process and to every allocation, not only candle's:
/// the resident size then stays at its peak, as with PyTorch's caching
/// allocator on GPUs. Results do not change, only the number of page faults.
/// The same policy can be set without code through glibc's environment:
/// `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615
/// MALLOC_TOP_PAD_=67108864 MALLOC_ARENA_MAX=1`.
///
/// Returns `true` when the policy was applied, `false` where the C library is
/// not glibc (nothing is changed there).
pub(crate) fn keep_freed_host_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const TOP_PAD: libc::c_int = 64 << 20;
        // SAFETY: mallopt only changes glibc's allocator parameters; it is safe
        // to call at any time, from any thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1) == 1
                && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
                && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
