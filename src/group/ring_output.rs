//! The result of a ring all-reduce while the steps build it: memory for the
//! whole tensor that the receiving side writes (sums, received chunks) while
//! the sending side reads what is already written, on two threads.
//!
//! On Unix the memory starts uninitialized (no pass over it before the
//! steps write it: the sums are written in place, received bytes go straight
//! into it with `recv`); elsewhere it starts zeroed. Which bytes each side
//! may touch when is the ring pipeline's protocol (its progress counters);
//! the methods here are `unsafe` and say what they need.

use super::ring_frame::{sum_into, RingElem};
use std::mem::MaybeUninit;
use std::ops::Range;

pub(crate) struct Output<T> {
    buf: Vec<T>,
    /// `buf`'s memory (capacity `count`), shared by the two sides.
    base: *mut T,
    count: usize,
}

// SAFETY: `Output` owns its memory like a `Vec<T>` (T is a plain float
// type); the two sides of the pipeline touch disjoint bytes at any time (the
// contract of the unsafe methods).
unsafe impl<T: Send> Send for Output<T> {}
unsafe impl<T: Sync> Sync for Output<T> {}

impl<T: RingElem> Output<T> {
    pub fn new(count: usize) -> Self {
        #[cfg(unix)]
        let mut buf = Vec::with_capacity(count);
        #[cfg(not(unix))]
        let mut buf = {
            let mut b = vec![T::zeroed(); count];
            b.clear();
            b
        };
        let base = buf.spare_capacity_mut().as_mut_ptr().cast::<T>();
        Output { buf, base, count }
    }

    /// Writes `local[i] + received[i]` at elements `at..` (bounds-checked).
    ///
    /// # Safety
    /// No other thread reads or writes those elements meanwhile.
    pub unsafe fn sum(&self, at: usize, local: &[T], received: &[T]) -> Option<()> {
        let len = local.len();
        if received.len() != len || at.checked_add(len)? > self.count {
            return None;
        }
        // SAFETY: within the capacity (checked); exclusive by the contract.
        let out = unsafe {
            std::slice::from_raw_parts_mut(self.base.add(at).cast::<MaybeUninit<T>>(), len)
        };
        sum_into(out, local, received);
        Some(())
    }

    /// Bytes `range` of the result (bounds-checked).
    ///
    /// # Safety
    /// The bytes were written (by `sum` or `recv`), and no thread writes them
    /// while the slice lives.
    pub unsafe fn bytes(&self, range: Range<usize>) -> Option<&[u8]> {
        if range.start > range.end || range.end > self.count * std::mem::size_of::<T>() {
            return None;
        }
        // SAFETY: within the capacity (checked); initialized and not written
        // meanwhile by the contract.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.base.cast::<u8>().add(range.start),
                range.end - range.start,
            )
        })
    }

    /// One read from `from` into bytes `at..at + max` of the result (bounds
    /// checked: never past its end); its result.
    ///
    /// # Safety
    /// No other thread reads or writes those bytes meanwhile.
    pub unsafe fn recv(
        &self,
        from: &std::net::TcpStream,
        at: usize,
        max: usize,
    ) -> std::io::Result<usize> {
        let room = (self.count * std::mem::size_of::<T>())
            .saturating_sub(at)
            .min(max);
        if room == 0 {
            return Ok(0);
        }
        // SAFETY (both): bytes [at, at + room) lie within the capacity;
        // exclusive by the contract.
        let dst = unsafe { self.base.cast::<u8>().add(at) };
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // recv writes at most `room` bytes; any bytes are valid values
            // of T (a plain float type).
            let got = unsafe { libc::recv(from.as_raw_fd(), dst.cast(), room, 0) };
            if got < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(got as usize)
            }
        }
        #[cfg(not(unix))]
        {
            use std::io::Read;
            // The memory was zeroed at the start: initialized bytes.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst, room) };
            let mut from = from;
            from.read(dst)
        }
    }

    /// The result.
    ///
    /// # Safety
    /// Every element was written.
    pub unsafe fn finish(mut self) -> Vec<T> {
        // SAFETY: by the contract, the `count` elements of the capacity
        // hold values.
        unsafe { self.buf.set_len(self.count) };
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_bounds_checked_and_receives_bytes_in_any_split() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let o = Output::<f32>::new(4);
        // SAFETY (all): one thread.
        unsafe {
            assert!(o.sum(3, &[1.0, 2.0], &[1.0, 2.0]).is_none(), "past the end");
            assert!(o.bytes(0..17).is_none(), "past the end");
            o.sum(0, &[1.0, 2.0], &[0.5, -4.0]).unwrap();
            assert_eq!(
                o.bytes(0..8).unwrap(),
                bytemuck::cast_slice::<f32, u8>(&[1.5, -2.0])
            );
            a.write_all(bytemuck::cast_slice(&[3.25f32, 4.0, 9.0]))
                .unwrap();
            // Elements split across reads of 3 bytes; never past the end.
            let mut at = 8;
            while at < 16 {
                let n = o.recv(&b, at, 3).unwrap();
                assert!(n > 0 && n <= 3);
                at += n;
            }
            assert_eq!(o.recv(&b, 16, 4).unwrap(), 0, "no room");
            assert_eq!(o.finish(), vec![1.5, -2.0, 3.25, 4.0]);
        }
    }
}
