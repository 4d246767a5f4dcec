#!/usr/bin/env python3
"""The TCP group's all-reduce against PyTorch's gloo (torch.distributed, CPU),
side by side on this machine.

For each world size and payload: several rounds, each running our ranks
(benches/allreduce.rs) and gloo's ranks (this file, --gloo-worker) as fresh
processes, alternating which side goes first; in each, rank 0 times
--iters all-reduces of f32 after --warmup untimed ones, each after a
barrier. Reports min/median/max over every timed iteration of each side and,
per round, the ratio gloo median / ours median (> 1: ours faster).
With --mpi (needs `mpirun` and Open MPI's headers: the bench is built with
the crate's `mpi` feature): the MPI group too, its ranks started by
`mpirun --oversubscribe --bind-to none` (no core binding, as the other two).
With --resnet18: the gradient averaging of a ResNet-18 (11.7 M f32 in 62
tensors; ours: data_parallel::average_gradients, 25 MiB buckets; gloo:
DDP-style 25 MiB flattened buckets, all_reduce, divide), for ours with the
ring and with rank 0's star (SYNCBN_RING_MIN_BYTES=off: the path before the
ring).

    python3 benches/compare_gloo.py                       # 2 and 4 ranks, 16 and 64 MiB
    python3 benches/compare_gloo.py --worlds 2 --mib 64 --rounds 5
    python3 benches/compare_gloo.py --resnet18 --worlds 2
    python3 benches/compare_gloo.py --mpi                 # MPI, TCP and gloo
"""
import argparse, json, os, socket, statistics, subprocess, sys, time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_ours(features):
    out = subprocess.run(
        ["cargo", "bench", "--bench", "allreduce", "--no-run", "--message-format=json"]
        + (["--features", features] if features else []),
        check=True, capture_output=True, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for line in out.stdout.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "allreduce" \
                and m.get("executable"):
            return m["executable"]
    sys.exit("cargo did not report the allreduce bench executable")


def run_ranks(cmd, world, extra_env, timeout=600):
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   SYNCBN_TOKEN="bench-token", OMP_NUM_THREADS="1", **extra_env)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, p in enumerate(procs):
        if p.returncode != 0:
            sys.exit(f"rank {r} of {cmd[0]} failed with {p.returncode}")
    for line in outs[0].splitlines():
        if line.startswith("{"):
            return json.loads(line)["times_ms"]
    sys.exit(f"no timings from rank 0 of {cmd}")


def run_mpirun(cmd, world, timeout=600):
    """`cmd` as `world` ranks of an MPI job (the bench picks the MPI group)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    p = subprocess.run(["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(world)] + cmd,
                       env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    if p.returncode != 0:
        sys.exit(f"mpirun of {cmd[0]} failed with {p.returncode}")
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)["times_ms"]
    sys.exit(f"no timings from rank 0 of the MPI job {cmd}")


def resnet18_shapes():
    import torchvision
    return [tuple(p.shape) for p in torchvision.models.resnet18().parameters()]


def gloo_worker(args):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    times = []
    if args.resnet18:
        torch.manual_seed(0)
        shapes = resnet18_shapes()
        params = [torch.zeros(s) for s in shapes]
        cap = 25 << 20
        for i in range(args.warmup + args.iters):
            grads = [torch.randn(s) for s in shapes]
            dist.barrier()
            t = time.perf_counter()
            # DDP-style: 25 MiB buckets of flattened gradients.
            start = 0
            while start < len(grads):
                end, size = start, 0
                while end < len(grads) and (end == start or size + grads[end].numel() * 4 <= cap):
                    size += grads[end].numel() * 4
                    end += 1
                flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
                dist.all_reduce(flat)
                flat.div_(world)
                off = 0
                for g in grads[start:end]:
                    g.copy_(flat[off:off + g.numel()].view_as(g))
                    off += g.numel()
                start = end
            if i >= args.warmup:
                times.append((time.perf_counter() - t) * 1e3)
        del params
    else:
        x = torch.randn(int(args.mib[0] * (1 << 20) / 4))
        for i in range(args.warmup + args.iters):
            y = x.clone()
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(y)
            if i >= args.warmup:
                times.append((time.perf_counter() - t) * 1e3)
    if dist.get_rank() == 0:
        print(json.dumps({"times_ms": times}))
    dist.destroy_process_group()


def summary(ts):
    return f"{min(ts):8.1f} {statistics.median(ts):8.1f} {max(ts):8.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--mib", type=float, nargs="+", default=[16, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--resnet18", action="store_true")
    ap.add_argument("--mpi", action="store_true", help="time the MPI group too (mpirun)")
    ap.add_argument("--gloo-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gloo_worker:
        return gloo_worker(args)
    ours = build_ours("mpi" if args.mpi else None)
    common = ["--iters", str(args.iters), "--warmup", str(args.warmup)]
    me = [sys.executable, os.path.abspath(__file__), "--gloo-worker"] + common
    cases = [(w, None) for w in args.worlds] if args.resnet18 else \
        [(w, m) for w in args.worlds for m in args.mib]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.uname().nodename}, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds x {args.iters} timed iterations (after {args.warmup} warm-up), "
          f"rank 0's times in ms")
    for world, mib in cases:
        what = ["--resnet18"] if mib is None else ["--mib", str(mib)]
        sides = {"ours": ([ours] + common + what, {}), "gloo": (me + what, {})}
        if args.mpi:
            sides["ours, mpi"] = ([ours] + common + what, None)
        if mib is None:
            sides["ours, star (before)"] = ([ours] + common + what, {"SYNCBN_RING_MIN_BYTES": "off"})
        times = {k: [] for k in sides}
        ratios = {k: [] for k in sides if k != "gloo"}
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
            med = {}
            for side in order:
                cmd, env = sides[side]
                ts = run_mpirun(cmd, world) if env is None else run_ranks(cmd, world, env)
                times[side] += ts
                med[side] = statistics.median(ts)
            for k in ratios:
                ratios[k].append(med["gloo"] / med[k])
        label = "resnet18 gradients (46.8 MB)" if mib is None else f"{mib:g} MiB f32"
        print(f"\n{world} ranks, {label}:            min   median      max")
        for side, ts in times.items():
            print(f"  {side:22s} {summary(ts)}")
        for k, rs in ratios.items():
            print(f"  gloo/{k} per round: " + ", ".join(f"{r:.2f}x" for r in rs)
                  + f" (median {statistics.median(rs):.2f}x)")


if __name__ == "__main__":
    main()
