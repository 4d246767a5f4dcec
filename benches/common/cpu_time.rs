//! Timing by the process's CPU time instead of the wall clock when
//! `SYNCBN_BENCH_CPU_TIME` is set (Unix): on a machine shared with other
//! work, a one-thread benchmark's wall time also counts the time the
//! scheduler gives to the other processes, and its CPU time does not (the
//! contention for caches and memory still shows). The kernels run on a
//! one-thread pool while the calling thread waits, so the process's CPU time
//! is the kernel's.

use criterion::Bencher;
use std::time::Duration;

/// The CPU time of this process (all its threads), where the system tells it.
#[cfg(unix)]
fn process_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid `timespec` for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

#[cfg(not(unix))]
fn process_cpu_time() -> Option<Duration> {
    None
}

/// Times `f` for criterion: by CPU time with `SYNCBN_BENCH_CPU_TIME` set
/// (where the system has it), else by the wall clock.
pub fn time<O>(b: &mut Bencher, mut f: impl FnMut() -> O) {
    let cpu = std::env::var_os("SYNCBN_BENCH_CPU_TIME").is_some();
    match process_cpu_time() {
        Some(_) if cpu => b.iter_custom(|iters| {
            let start = process_cpu_time().unwrap_or_default();
            for _ in 0..iters {
                std::hint::black_box(f());
            }
            process_cpu_time().unwrap_or_default().saturating_sub(start)
        }),
        _ => b.iter(f),
    }
}
