//! `keep_freed_memory(&Device::Cpu)`: after it, a large buffer that is freed and
//! allocated again costs no page faults (glibc keeps the memory). A test binary
//! of its own without the test harness, since the policy applies to the whole
//! process and is meant to be set on its main thread before others start.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    const SIZE: usize = 96 << 20;
    const PAGE: usize = 4096;

    /// Minor page faults of this process so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
            usage.ru_minflt
        }
    }

    /// Page faults taken while filling a fresh `SIZE`-byte buffer, then freeing it.
    fn faults_of_one_buffer() -> i64 {
        let before = minor_faults();
        let buf = std::hint::black_box(vec![1u8; SIZE]);
        assert_eq!(buf[SIZE - 1], 1);
        drop(buf);
        minor_faults() - before
    }

    pub fn a_freed_buffer_is_reused_without_page_faults() {
        let pages = (SIZE / PAGE) as i64;
        // glibc's default: above 32 MiB every buffer is a fresh mmap (printed
        // only: with transparent huge pages set to "always" it faults less).
        faults_of_one_buffer();
        let default_policy = faults_of_one_buffer();
        println!("default policy: {default_policy} page faults to refill {pages} pages");

        assert!(candle_syncbn::keep_freed_memory(&candle::Device::Cpu).unwrap());
        faults_of_one_buffer(); // grows the heap once
        let kept = faults_of_one_buffer();
        println!("keep_freed_memory: {kept} page faults to refill {pages} pages");
        assert!(
            kept < pages / 20,
            "{kept} page faults to refill a freed {SIZE}-byte buffer ({pages} pages)"
        );
        // A thread started afterwards shares the heap, so it reuses the memory too.
        let in_thread = std::thread::spawn(|| {
            faults_of_one_buffer();
            faults_of_one_buffer()
        })
        .join()
        .unwrap();
        println!("keep_freed_memory, new thread: {in_thread} page faults to refill {pages} pages");
        assert!(
            in_thread < pages / 20,
            "{in_thread} page faults in a new thread"
        );
    }
}

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::a_freed_buffer_is_reused_without_page_faults();
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    assert!(!candle_syncbn::keep_freed_memory(&candle::Device::Cpu).unwrap());
    println!("1 passed, 0 failed");
}
