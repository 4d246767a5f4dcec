//! The TCP group with its ranks as threads of this process (real sockets on
//! 127.0.0.1, rank 0 on a port chosen by the OS and published through a port
//! file, so parallel tests never collide).

use crate::common;

use candle::{DType, Device, Tensor};
use candle_syncbn::group::TcpOptions;
use candle_syncbn::{error_kind, ErrorKind, ProcessGroup};
use common::{loopback_rendezvous, port_file, raw_frame, raw_header, raw_rank, raw_ring_opt_out};
use std::io::Write;
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn opts(timeout_ms: u64) -> TcpOptions {
    TcpOptions::default()
        .with_timeout(Duration::from_millis(timeout_ms))
        .with_rendezvous_timeout(Duration::from_millis(timeout_ms.max(3000)))
}

/// Runs `f(group)` on `world` ranks (threads), each joining the TCP group.
fn run<T: Send + 'static>(
    world: usize,
    timeout_ms: u64,
    f: impl Fn(ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    run_with(world, opts(timeout_ms), f)
}

/// [`run`] with the given options.
fn run_with<T: Send + 'static>(
    world: usize,
    options: TcpOptions,
    f: impl Fn(ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let pf = port_file("tcp-test");
    let handles: Vec<JoinHandle<T>> = (0..world)
        .map(|r| {
            let (f, pf) = (f.clone(), pf.clone());
            std::thread::spawn(move || {
                let g =
                    ProcessGroup::tcp(&loopback_rendezvous(r, world, &pf, "tok"), options).unwrap();
                f(g)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn all_reduce_broadcast_barrier() {
    let out = run(3, 5000, |g| {
        let r = g.rank() as f32;
        let x = Tensor::new(&[[r, 1.0, 0.1], [2.0 * r, -r, 1e8]], &Device::Cpu).unwrap();
        let s32 = g.all_reduce_sum(&x).unwrap();
        let s64 = g.all_reduce_sum(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let b = g
            .broadcast(
                &Tensor::new(&[10 * g.rank() as i64 + 7], &Device::Cpu).unwrap(),
                1,
            )
            .unwrap();
        g.barrier().unwrap();
        (
            s32.to_vec2::<f32>().unwrap(),
            s64.to_vec2::<f64>().unwrap(),
            b.to_vec1::<i64>().unwrap(),
            s32.dtype(),
        )
    });
    for (s32, s64, b, dtype) in &out {
        assert_eq!(*dtype, DType::F32);
        // f32 values summed in f64, rounded once.
        assert_eq!(
            s32,
            &vec![
                vec![3.0, 3.0, (0.1f32 as f64 * 3.0) as f32],
                vec![6.0, -3.0, 3e8]
            ]
        );
        assert_eq!(s64[0][2], 0.1f32 as f64 * 3.0);
        assert_eq!(b, &vec![17]);
    }
    // identical on every rank, bit for bit
    assert!(out.iter().all(|o| o.0 == out[0].0 && o.1 == out[0].1));
}

/// Subgroups over TCP: each pair of ranks sums and broadcasts among itself
/// (an i64 broadcast too), and the whole group still works afterwards.
#[test]
fn subgroups_reduce_within_each_pair() {
    let out = run(4, 5000, |g| {
        let r = g.rank();
        let pair = g.subgroups(2).unwrap();
        assert_eq!((pair.rank(), pair.world_size()), (r % 2, 2));
        let x = Tensor::new(&[r as f32, 1.0, -0.0], &Device::Cpu).unwrap();
        let s = pair.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
        let b = pair
            .broadcast(
                &Tensor::new(&[r as i64 - (3 << 40), 7], &Device::Cpu).unwrap(),
                1,
            )
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        pair.barrier().unwrap();
        let all = g.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
        (s, b, all)
    });
    for (r, (s, b, all)) in out.iter().enumerate() {
        let first = (r - r % 2) as f32;
        assert_eq!(&s[..2], &[2.0 * first + 1.0, 2.0], "rank {r}");
        assert!(s[2] == 0.0 && s[2].is_sign_negative(), "rank {r}: {}", s[2]);
        assert_eq!(b, &vec![(r - r % 2) as i64 + 1 - (3 << 40), 7], "rank {r}");
        assert_eq!(&all[..2], &[6.0, 4.0], "rank {r}");
    }
}

#[test]
fn disagreeing_ranks_all_fail_then_fail_fast() {
    let out = run(3, 5000, |g| {
        let c = if g.rank() == 1 { 5 } else { 4 };
        let x = Tensor::zeros((3, c), DType::F64, &Device::Cpu).unwrap();
        let first = g.all_reduce_sum(&x).unwrap_err();
        let t = Instant::now();
        let second = g.all_reduce_sum(&x).unwrap_err();
        // Every rank (the ones rank 0 told included), the later call too.
        for e in [&first, &second] {
            assert_eq!(error_kind(e), Some(ErrorKind::RanksDisagree), "{e}");
        }
        (first.to_string(), second.to_string(), t.elapsed())
    });
    for (first, second, dt) in out {
        assert!(first.contains("disagree"), "{first}");
        assert!(
            first.contains("rank 1: collective #0: all_reduce_sum of 15 f64"),
            "{first}"
        );
        assert!(second.contains("unusable"), "{second}");
        assert!(dt < Duration::from_secs(1), "{dt:?}");
    }
}

#[test]
fn different_order_of_calls_fails() {
    let out = run(2, 5000, |g| {
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let r = if g.rank() == 0 {
            g.all_reduce_sum(&x).map(|_| ())
        } else {
            g.broadcast(&x, 0).map(|_| ())
        };
        r.unwrap_err().to_string()
    });
    for e in out {
        assert!(e.contains("disagree") && e.contains("broadcast"), "{e}");
    }
}

#[test]
fn wrong_token_is_refused() {
    let pf = port_file("tcp-test");
    let pf0 = pf.clone();
    let root = std::thread::spawn(move || {
        let mut o = opts(1000);
        o.rendezvous_timeout = Duration::from_millis(1500);
        ProcessGroup::tcp(&loopback_rendezvous(0, 2, &pf0, "right"), o).map(|_| ())
    });
    let e = ProcessGroup::tcp(&loopback_rendezvous(1, 2, &pf, "wrong"), opts(1000)).unwrap_err();
    assert!(e.to_string().contains("wrong job token"), "{e}");
    let e = root.join().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("did not join") && e.contains("wrong job token"),
        "{e}"
    );
}

#[test]
fn duplicate_rank_and_hostile_hello_are_refused() {
    let pf = port_file("tcp-test");
    let handles: Vec<_> = [0usize, 1, 2]
        .into_iter()
        .map(|r| {
            let pf = pf.clone();
            std::thread::spawn(move || {
                if r == 2 {
                    // joins late, after the duplicate was refused
                    std::thread::sleep(Duration::from_millis(600));
                }
                let g = ProcessGroup::tcp(&loopback_rendezvous(r, 3, &pf, "tok"), opts(5000))?;
                g.all_reduce_sum(&Tensor::ones(2, DType::F32, &Device::Cpu)?)?
                    .to_vec1::<f32>()
            })
        })
        .collect();
    // wait for rank 0's port
    let port: u16 = loop {
        if let Some(p) = std::fs::read_to_string(&pf)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A hostile peer claiming a 1 TiB hello, and garbage: both refused, nothing allocated.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut h = [0u8; 40];
    h[0..4].copy_from_slice(b"SBN1");
    h[4] = 1;
    h[7] = 1;
    h[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes());
    s.write_all(&h).unwrap();
    let mut g = TcpStream::connect(("127.0.0.1", port)).unwrap();
    g.write_all(&[0xAB; 40]).unwrap();
    // a second rank 1
    std::thread::sleep(Duration::from_millis(200));
    let dup = ProcessGroup::tcp(&loopback_rendezvous(1, 3, &pf, "tok"), opts(2000));
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let dup_err = dup.err().map(|e| e.to_string());
    // One of the two rank-1 processes got refused as a duplicate; the group works.
    assert!(
        dup_err
            .as_deref()
            .is_some_and(|e| e.contains("already joined"))
            || results[1]
                .as_ref()
                .is_err_and(|e| e.to_string().contains("already joined")),
        "{dup_err:?} {results:?}"
    );
    assert_eq!(results[0].as_ref().unwrap(), &vec![3.0, 3.0]);
}

#[test]
fn silent_rank_times_out_and_dropped_rank_is_named() {
    let out = run(3, 800, |g| {
        let x = Tensor::ones(3, DType::F64, &Device::Cpu).unwrap();
        g.all_reduce_sum(&x).unwrap();
        if g.rank() == 1 {
            std::thread::sleep(Duration::from_millis(2500));
            return (String::new(), Duration::ZERO);
        }
        let t = Instant::now();
        let e = g.all_reduce_sum(&x).unwrap_err();
        // Rank 0 timed out; rank 2 learns the kind from rank 0's error frame.
        assert_eq!(error_kind(&e), Some(ErrorKind::Timeout), "{e}");
        (e.to_string(), t.elapsed())
    });
    for (e, dt) in [&out[0], &out[2]] {
        assert!(e.contains("rank 1 did not answer"), "{e}");
        assert!(*dt < Duration::from_millis(800 + 400), "{dt:?}");
    }
    let out = run(2, 10_000, |g| {
        if g.rank() == 1 {
            drop(g);
            return String::new();
        }
        let t = Instant::now();
        let e = g
            .all_reduce_sum(&Tensor::ones(3, DType::F64, &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(
            error_kind(&e),
            Some(ErrorKind::PeerFailed { rank: 1 }),
            "{e}"
        );
        e.to_string()
    });
    assert!(
        out[0].contains("rank 1 closed the connection"),
        "{}",
        out[0]
    );
}

/// Two layers of the same shape called in a different order: rank 0 sees
/// the tags differ at the first call and every rank gets an error naming
/// both layers, well before the timeout (issue 23 item 11).
#[test]
fn layers_called_in_a_different_order_fail_on_every_rank() {
    for composite in [false, true] {
        let start = Instant::now();
        let runs = run(2, 10_000, move |g| {
            common::swapped_layers(g, composite, false)
        });
        common::check_swapped(&runs, composite);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }
}

/// Layers with equal names (two models' `bn`, empty prefixes, converted
/// layers of one width) called in a different order: every rank gets an
/// error naming both at the first call, well before the timeout (issue 29
/// item 5).
#[test]
fn same_name_layers_called_in_a_different_order_fail_on_every_rank() {
    for case in [
        common::SameName::TwoModels,
        common::SameName::EmptyPrefix,
        common::SameName::Converted,
    ] {
        let start = Instant::now();
        let runs = run(2, 10_000, move |g| common::swapped_same_name(g, case, true));
        common::check_swapped_same_name(&runs, case);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{case:?}: {:?}",
            start.elapsed()
        );
    }
}

/// Many layers of the same shape, one called twice per step, several steps
/// forward and backward, same order on every rank: the ranks match one rank
/// on the whole batch.
#[test]
fn a_stack_of_same_shaped_layers_matches_one_rank() {
    for composite in [false, true] {
        let bounds = [0, 4, 6];
        let runs = run(2, 10_000, move |g| {
            let rows = bounds[g.rank()]..bounds[g.rank() + 1];
            common::layer_stack(g, rows, composite).unwrap()
        });
        common::check_layer_stack(
            &format!("tcp, composite {composite}"),
            &runs,
            &bounds,
            composite,
        );
    }
}

/// An authenticated rank that declares a 2 GiB all-reduce while rank 0 is in
/// a barrier: rank 0 compares the header with its own call before reading
/// the payload, so it reports at once that the ranks disagree (naming both
/// calls) and tells the rank so, instead of reading until the timeout and
/// blaming the rank for not answering (issue 29 item 6).
#[test]
fn a_rank_declaring_another_call_is_refused_before_its_payload() {
    let pf = port_file("tcp-test");
    let timeout = Duration::from_secs(15);
    let rank0 = {
        let pf = pf.clone();
        std::thread::spawn(move || {
            let options = TcpOptions::default()
                .with_timeout(timeout)
                .with_rendezvous_timeout(Duration::from_secs(10));
            let g = ProcessGroup::tcp(&loopback_rendezvous(0, 2, &pf, "tok"), options)?;
            let start = Instant::now();
            let e = g.barrier().unwrap_err();
            Ok::<_, candle::Error>((e.to_string(), start.elapsed()))
        })
    };
    let port: u16 = loop {
        if let Some(p) = std::fs::read_to_string(&pf)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        assert!(!rank0.is_finished(), "rank 0 failed to start");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut s = raw_rank(port, 1, 2, "tok");
    raw_ring_opt_out(&mut s, 2);
    // Collective #0: an all-reduce of 2^29 f32 (2 GiB, the default limit),
    // of which only the first 64 KiB ever come.
    let count = 1u64 << 29;
    s.write_all(&raw_header(4, 1, 8, 0, 0, count, 4 * count))
        .unwrap();
    s.write_all(&[0u8; 1 << 16]).unwrap();
    let (e, took) = rank0.join().unwrap().unwrap();
    assert!(e.contains("disagree"), "{e}");
    assert!(e.contains("rank 0: collective #0: barrier"), "{e}");
    assert!(
        e.contains(&format!(
            "rank 1: collective #0: all_reduce_sum of {count} f32"
        )),
        "{e}"
    );
    assert!(took < timeout / 3, "{took:?}: {e}");
    // The rank is told why.
    let (h, msg) = raw_frame(&mut s).unwrap();
    assert_eq!(h[4], 5, "an error frame");
    assert!(String::from_utf8_lossy(&msg).contains("disagree"));
}

/// Rank `r`'s value at `i`: magnitudes from 1e-3 to 1e7 and both signs, so
/// that the order of the additions shows in the rounding.
fn ring_value(r: usize, i: usize) -> f64 {
    let mut z = (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 29)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 32;
    let unit = (z % 1_000_003) as f64 / 1_000_003.0 - 0.5;
    unit * 10f64.powi((z >> 40) as i32 % 11 - 3)
}

/// The documented order of the ring: element `i` lies in chunk `c` (the
/// `count` elements split into `world` chunks, the first `count % world` one
/// longer), whose sum runs `x_c + x_{c+1} + … + x_{c-1}` (ranks mod world),
/// each addition rounded to f32.
fn ring_order_f32(world: usize, count: usize, i: usize) -> f32 {
    let (base, rem) = (count / world, count % world);
    let chunk = (0..world)
        .find(|&c| i < (c + 1) * base + (c + 1).min(rem))
        .unwrap();
    let mut acc = ring_value(chunk, i) as f32;
    for k in 1..world {
        acc += ring_value((chunk + k) % world, i) as f32;
    }
    acc
}

/// Large all-reduces run over the ring: f32 summed in f32 in the fixed
/// ring order (bitwise what that order gives, within rounding of the f64
/// sum), bitwise the same on every rank and from call to call; world sizes
/// 2, 3 and 4 and counts that the world size does not divide (fewer
/// elements than ranks too). f64 and bf16 go through the ring as well;
/// small calls still take rank 0's f64 path, between ring calls.
#[test]
fn ring_all_reduce_sums_in_a_fixed_order_on_every_rank() {
    for world in [2, 3, 4] {
        // The default threshold (256 KiB) with a count above it, and every
        // call on the ring for small counts.
        for (ring_min_bytes, counts) in [(256 << 10, vec![65_539]), (0, vec![1, 3, 5, 1_001])] {
            let options = opts(10_000).with_ring_min_bytes(ring_min_bytes);
            let counts2 = counts.clone();
            let out = run_with(world, options, move |g| {
                let r = g.rank();
                let mut results = Vec::new();
                for &n in &counts2 {
                    let x: Vec<f32> = (0..n).map(|i| ring_value(r, i) as f32).collect();
                    let x = Tensor::new(x, &Device::Cpu).unwrap();
                    let a = g.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
                    // A small call through rank 0 between ring calls.
                    let small = g
                        .all_reduce_sum(&Tensor::new(&[0.1f32, r as f32], &Device::Cpu).unwrap())
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let b = g.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
                    let x64 = x.to_dtype(DType::F64).unwrap();
                    let d = g.all_reduce_sum(&x64).unwrap().to_vec1::<f64>().unwrap();
                    let xb = x.to_dtype(DType::BF16).unwrap();
                    let h = g.all_reduce_sum(&xb).unwrap();
                    assert_eq!(h.dtype(), DType::BF16);
                    let h = h.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
                    results.push((a, b, small, d, h));
                }
                results
            });
            for (k, &n) in counts.iter().enumerate() {
                let (a0, _, _, d0, h0) = &out[0][k];
                for (r, o) in out.iter().enumerate() {
                    let (a, b, small, d, h) = &o[k];
                    let same = |x: &[f32], y: &[f32]| {
                        x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
                    };
                    assert!(same(a, a0) && same(b, a0), "world {world}, n {n}, rank {r}");
                    assert!(d == d0 && h == h0, "world {world}, n {n}, rank {r}");
                    // Rank 0's path: exact in f64, rounded once.
                    let want = (0.1f32 as f64 * world as f64) as f32;
                    assert_eq!(small[0], want, "world {world}");
                }
                for i in 0..n {
                    let exact: f64 = (0..world).map(|r| ring_value(r, i) as f32 as f64).sum();
                    let magnitude: f64 = (0..world)
                        .map(|r| (ring_value(r, i) as f32 as f64).abs())
                        .sum();
                    let ctx = format!("world {world}, n {n}, element {i}");
                    assert_eq!(
                        a0[i].to_bits(),
                        ring_order_f32(world, n, i).to_bits(),
                        "{ctx}"
                    );
                    let tol = world as f64 * f32::EPSILON as f64 * magnitude;
                    assert!((a0[i] as f64 - exact).abs() <= tol, "{ctx}");
                    assert!((d0[i] - exact).abs() <= 1e-12 * magnitude, "{ctx}");
                    assert!((h0[i] - exact).abs() <= 0.02 * magnitude, "{ctx}");
                }
            }
        }
    }
}

/// The ring reads a contiguous CPU tensor where it lies (also at an offset
/// into its storage, as a narrowed tensor) and copies any other layout
/// first: the sums are the same, and the input is left untouched.
#[test]
fn ring_reads_views_and_strided_tensors_like_contiguous_ones() {
    let options = opts(10_000).with_ring_min_bytes(0);
    let out = run_with(3, options, |g| {
        let r = g.rank();
        let v: Vec<f32> = (0..6_000).map(|i| ring_value(r, i) as f32).collect();
        let x = Tensor::from_vec(v.clone(), (60, 100), &Device::Cpu).unwrap();
        let sum = |t: &Tensor| {
            let s = g.all_reduce_sum(t).unwrap();
            assert_eq!(s.dims(), t.dims());
            s.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let narrowed = x.narrow(0, 7, 40).unwrap();
        let transposed = x.t().unwrap();
        // The same values in a storage of their own (`contiguous` would keep
        // the view).
        let fresh = narrowed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let fresh = Tensor::from_vec(fresh, (40, 100), &Device::Cpu).unwrap();
        let (a, b) = (sum(&narrowed), sum(&fresh));
        let (c, d) = (sum(&transposed), sum(&transposed.contiguous().unwrap()));
        assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v);
        (a, b, c, d)
    });
    for (a, b, c, d) in out {
        assert_eq!(a.len(), 4_000);
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert!(c.iter().zip(&d).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

/// A large call that the ranks disagree on (count or tag) fails on every
/// rank before any payload moves, and the group is unusable afterwards; a
/// rank that stalls before a large call makes the others fail within the
/// timeout, naming it.
#[test]
fn ring_calls_are_checked_and_time_out() {
    let out = run(3, 5000, |g| {
        let n = if g.rank() == 2 { 100_001 } else { 100_000 };
        let x = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let first = g.all_reduce_sum(&x).unwrap_err().to_string();
        let t = Instant::now();
        let second = g.all_reduce_sum(&x).unwrap_err().to_string();
        (first, second, t.elapsed())
    });
    for (first, second, dt) in out {
        assert!(first.contains("disagree"), "{first}");
        assert!(
            first.contains("rank 2: collective #0: all_reduce_sum of 100001 f32 (check)"),
            "{first}"
        );
        assert!(second.contains("unusable"), "{second}");
        assert!(dt < Duration::from_secs(1), "{dt:?}");
    }
    let out = run(3, 800, |g| {
        let x = Tensor::ones(200_000, DType::F32, &Device::Cpu).unwrap();
        let s = g.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!(s.iter().all(|&v| v == 3.0));
        if g.rank() == 1 {
            std::thread::sleep(Duration::from_millis(2500));
            return (String::new(), Duration::ZERO);
        }
        let t = Instant::now();
        let e = g.all_reduce_sum(&x).unwrap_err();
        // Rank 0 timed out; rank 2 learns the kind from rank 0's error frame.
        assert_eq!(error_kind(&e), Some(ErrorKind::Timeout), "{e}");
        (e.to_string(), t.elapsed())
    });
    for (e, dt) in [&out[0], &out[2]] {
        assert!(e.contains("rank 1 did not answer"), "{e}");
        assert!(*dt < Duration::from_millis(800 + 600), "{dt:?}");
    }
}
