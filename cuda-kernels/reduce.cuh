// Deterministic reductions shared by every SyncBatchNorm kernel: Welford/Chan
// merges of (count, mean, M2) and plain sums, across a warp (shuffles) and a
// block (shared memory), always combined in the same fixed tree order, so
// results are bitwise reproducible. No atomics.
#pragma once

namespace syncbn {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int WARP = 32;

// Count, mean and sum of squared deviations of a set of values.
template <typename A> struct Welford {
    A n, mean, m2;
};

template <typename A> __device__ __forceinline__ Welford<A> welford_empty() {
    return Welford<A>{A(0), A(0), A(0)};
}

// Chan et al.'s combination of two sets, in the form the CPU path uses
// (src/cpu/reductions.rs): exact for empty sets on either side.
template <typename A> __device__ __forceinline__ Welford<A> chan_merge(const Welford<A>& a, const Welford<A>& b) {
    if (b.n == A(0)) return a;
    if (a.n == A(0)) return b;
    const A n = a.n + b.n;
    const A delta = b.mean - a.mean;
    Welford<A> r;
    r.n = n;
    r.mean = a.mean + delta * (b.n / n);
    r.m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / n);
    return r;
}

// Merges a set into a running accumulator with one division (the hot loop).
template <typename A> __device__ __forceinline__ void welford_add(Welford<A>& acc, A n, A mean, A m2) {
    if (acc.n == A(0)) {
        acc = Welford<A>{n, mean, m2};
        return;
    }
    const A total = acc.n + n;
    const A r = n / total;
    const A delta = mean - acc.mean;
    acc.mean += delta * r;
    acc.m2 += m2 + delta * delta * (acc.n * r);
    acc.n = total;
}

// Tree over the 32 lanes with shfl_down: lane 0 ends with the merge of all lanes
// in a fixed order; other lanes hold partial results. All 32 lanes must call it.
template <typename A> __device__ __forceinline__ Welford<A> warp_merge(Welford<A> w) {
#pragma unroll
    for (int off = WARP / 2; off > 0; off >>= 1) {
        Welford<A> o;
        o.n = __shfl_down_sync(FULL_MASK, w.n, off);
        o.mean = __shfl_down_sync(FULL_MASK, w.mean, off);
        o.m2 = __shfl_down_sync(FULL_MASK, w.m2, off);
        w = chan_merge(w, o);
    }
    return w;
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int off = WARP / 2; off > 0; off >>= 1) v += __shfl_down_sync(FULL_MASK, v, off);
    return v;
}

// Block-wide merge for a 1-D block of `blockDim.x` threads (a multiple of 32, at
// most 1024). Thread 0 gets the result. All threads must call it; it contains
// __syncthreads, and `sh` (32 entries) may be reused after it returns.
template <typename A> __device__ __forceinline__ Welford<A> block_merge(Welford<A> w, Welford<A>* sh) {
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int nwarps = blockDim.x / WARP;
    w = warp_merge(w);
    if (lane == 0) sh[warp] = w;
    __syncthreads();
    if (warp == 0) {
        w = lane < nwarps ? sh[lane] : welford_empty<A>();
        w = warp_merge(w);
    }
    __syncthreads();
    return w;
}

// Block-wide sum of two values for a 1-D block (see block_merge). Thread 0 gets them.
template <typename A> __device__ __forceinline__ void block_sum2(A& a, A& b, A* sh_a, A* sh_b) {
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int nwarps = blockDim.x / WARP;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
        sh_a[warp] = a;
        sh_b[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < nwarps ? sh_a[lane] : A(0);
        b = lane < nwarps ? sh_b[lane] : A(0);
        a = warp_sum(a);
        b = warp_sum(b);
    }
    __syncthreads();
}

}  // namespace syncbn
