//! One rank of the all-reduce benchmark of the TCP group (run by
//! `benches/compare_gloo.py`, which starts the ranks and the gloo side).
//!
//! Reads the rank from the launcher's environment (`RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`, `SYNCBN_TOKEN`, `SYNCBN_RING_MIN_BYTES`:
//! `off` times rank 0's star, the path of every all-reduce before the ring),
//! then times, after a barrier each, `--iters` all-reduces of `--mib` MiB of
//! f32 (or, with `--resnet18`, `average_gradients` over the gradients of a
//! ResNet-18, 11.7 M f32 parameters in 62 tensors). Rank 0 prints one JSON
//! line: `{"times_ms": [...]}`. Built with `--features mpi` and started by
//! `mpirun`, it times the MPI group instead (`compare_gloo.py --mpi`).

use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use candle_syncbn::data_parallel::average_gradients;
use candle_syncbn::ProcessGroup;
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The parameter shapes of torchvision's ResNet-18.
fn resnet18_shapes() -> Vec<(String, Vec<usize>)> {
    let mut s = vec![("conv1.weight".to_string(), vec![64, 3, 7, 7])];
    let bn = |s: &mut Vec<(String, Vec<usize>)>, name: &str, c: usize| {
        s.push((format!("{name}.weight"), vec![c]));
        s.push((format!("{name}.bias"), vec![c]));
    };
    bn(&mut s, "bn1", 64);
    let mut cin = 64;
    for (l, cout) in [64, 128, 256, 512].into_iter().enumerate() {
        for b in 0..2 {
            let p = format!("layer{}.{b}", l + 1);
            let first_in = if b == 0 { cin } else { cout };
            s.push((format!("{p}.conv1.weight"), vec![cout, first_in, 3, 3]));
            bn(&mut s, &format!("{p}.bn1"), cout);
            s.push((format!("{p}.conv2.weight"), vec![cout, cout, 3, 3]));
            bn(&mut s, &format!("{p}.bn2"), cout);
            if b == 0 && first_in != cout {
                s.push((
                    format!("{p}.downsample.0.weight"),
                    vec![cout, first_in, 1, 1],
                ));
                bn(&mut s, &format!("{p}.downsample.1"), cout);
            }
        }
        cin = cout;
    }
    s.push(("fc.weight".to_string(), vec![1000, 512]));
    s.push(("fc.bias".to_string(), vec![1000]));
    s
}

fn main() -> candle::Result<()> {
    let iters: usize = arg("--iters").map_or(5, |v| v.parse().expect("--iters"));
    let warmup: usize = arg("--warmup").map_or(2, |v| v.parse().expect("--warmup"));
    let dev = Device::Cpu;
    // The allocator policy the crate recommends for CPU training (freed
    // memory is reused instead of page-faulted in again).
    let _ = candle_syncbn::keep_freed_memory(&candle::Device::Cpu);
    let group = ProcessGroup::from_env(&dev)?;
    let mut times = Vec::new();
    if std::env::args().any(|a| a == "--resnet18") {
        let varmap = VarMap::new();
        let mut vars = Vec::new();
        for (name, shape) in resnet18_shapes() {
            let v = varmap.get(
                shape.as_slice(),
                &name,
                candle_nn::Init::Const(0.),
                DType::F32,
                &dev,
            )?;
            vars.push(v);
        }
        let data = varmap.all_vars();
        for i in 0..warmup + iters {
            // Fresh gradients each step, as after a backward pass.
            let mut loss = Tensor::zeros((), DType::F32, &dev)?;
            for v in &data {
                let noise = Tensor::randn(0f32, 1.0, v.shape(), &dev)?;
                loss = (loss + (v.as_tensor() * noise)?.sum_all()?)?;
            }
            let mut grads = loss.backward()?;
            group.barrier()?;
            let t = Instant::now();
            average_gradients(&varmap, &mut grads, &group)?;
            if i >= warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        drop(vars);
    } else {
        let mib: f64 = arg("--mib").map_or(16.0, |v| v.parse().expect("--mib"));
        let n = (mib * (1 << 20) as f64 / 4.0) as usize;
        let x = Tensor::randn(0f32, 1.0, n, &dev)?;
        for i in 0..warmup + iters {
            group.barrier()?;
            let t = Instant::now();
            let y = group.all_reduce_sum(&x)?;
            if i >= warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            drop(y);
        }
    }
    if group.rank() == 0 {
        let list: Vec<String> = times.iter().map(|t| format!("{t:.3}")).collect();
        println!("{{\"times_ms\": [{}]}}", list.join(", "));
    }
    Ok(())
}
