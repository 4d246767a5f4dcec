// Forward statistics of SyncBatchNorm: per-rank count/mean/M2 per channel
// (two levels: partials per work item, then a fixed-order combine in f64), the
// moments (mean, invstd), the in-place running-statistics update and the
// num_batches_tracked increment. See src/ops/batch_stats.rs, moments.rs and
// running_stats.rs for the Rust side and the CPU reference.
#include "coef.cuh"
#include "dtype.cuh"
#include "reduce.cuh"
#include "tile.cuh"
#include "view.cuh"

using namespace syncbn;

// ---------------------------------------------------------------------------
// Level 1, channel-major path (elements of a channel form `outer` rows of
// `inner` values; the common (N, C, H, W) contiguous case).
//
// Work split: the `outer * inner` values of each channel are cut into `chunks`
// consecutive chunks of `chunk_len` values (a multiple of 16, so vectors never
// straddle a chunk). One task = (channel, chunk), handled by a group of
// `group` threads: a whole block (group == BLOCK) when channels are large, or a
// single warp (group == 32, BLOCK / 32 tasks per block) when they are small
// (many channels, tiny spatial size). The host picks `chunks` so that there are
// enough groups to fill the GPU (few channels with a large spatial size get
// many chunks per channel). Within a group, thread g reads the vectors
// g, g + group, g + 2 group, ... of the chunk (coalesced), UNROLL of them per
// register tile; each tile's moments come from a corrected two-pass over the
// registers and are merged into the thread's Welford state (Chan), then the
// group merges its threads in a fixed tree. Task t writes partial[t] =
// (n, mean, M2), t = channel * chunks + chunk.
//
// bn_stats_major_* loads 16 bytes at a time (inner_stride == 1, inner, strides
// and offset multiples of VEC and a 16-byte aligned base: checked by the host);
// bn_stats_major_half_{f16,bf16} loads 8 bytes (VEC / 2 values: the same
// conditions with multiples of VEC / 2, e.g. rows of 14x14 = 196 values);
// bn_stats_major_scalar_* loads single elements, VEC times as many per tile
// (TileDepth). Entry points of their own, so that each gets the registers of
// its own path only (on an H200 the scalar bf16 path took 55 us on
// (32, 1024, 14, 14), at 5% of the DRAM bandwidth).
// ---------------------------------------------------------------------------

template <typename T, int W>
__device__ __forceinline__ Welford<typename Traits<T>::Acc> stats_major_thread(
    const T* __restrict__ x, const View& v, long long c, long long j, const long long j1, const long long step) {
    using A = typename Traits<T>::Acc;
    Welford<A> acc = welford_empty<A>();
    if (j >= j1) return acc;
    const T* __restrict__ base = x + v.offset + c * v.channel_stride;
    PlanePos pos{j / v.inner, j % v.inner};
    const PlaneStep st = plane_step(step, v.inner);
    constexpr int U = TileDepth<T, W>::value;
    while (j < j1) {
        Pack<T, W> vals[U];
        int cnt = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (j < j1) {
                vals[u] = load_pack<T, W>(base + pos.o * v.outer_stride + pos.i * v.inner_stride);
                cnt = u + 1;
            }
            j += step;
            plane_advance(pos, st, v.inner);
        }
        tile_moments_all<T, U, W>(acc, vals, cnt);
    }
    return acc;
}

// W: values per load (VEC, VEC / 2 or 1).
template <typename T, int W>
__device__ __forceinline__ void stats_major(const T* __restrict__ x, const View v, const long long chunk_len,
                                            const long long chunks, const int group,
                                            double* __restrict__ partial) {
    using A = typename Traits<T>::Acc;
    const int tasks_per_block = blockDim.x / group;
    const long long task = (long long)blockIdx.x * tasks_per_block + threadIdx.x / group;
    const int g = threadIdx.x % group;
    const long long total = v.channels * chunks;
    const long long plane = v.outer * v.inner;
    Welford<A> w = welford_empty<A>();
    if (task < total) {
        const long long c = task / chunks;
        const long long k = task % chunks;
        const long long j0 = k * chunk_len;
        const long long j1 = min(plane, j0 + chunk_len);
        w = stats_major_thread<T, W>(x, v, c, j0 + (long long)g * W, j1, (long long)group * W);
    }
    if (group == WARP) {
        // A warp is one task (or none, past the end): all its lanes take part.
        w = warp_merge(w);
    } else {
        // One task per block: every thread of the block reaches the barriers.
        __shared__ Welford<A> sh[WARP];
        w = block_merge(w, sh);
    }
    if (g == 0 && task < total) {
        double* p = partial + task * 3;
        p[0] = static_cast<double>(w.n);
        p[1] = static_cast<double>(w.mean);
        p[2] = static_cast<double>(w.m2);
    }
}

// ---------------------------------------------------------------------------
// Level 1, channel-innermost path (inner == 1, channel_stride == 1: a permuted
// NHWC tensor or a 2-D (N, C) batch): `outer` rows of C contiguous channels.
//
// Work split: a 2-D block (blockDim.x = BX threads along channels, blockDim.y =
// BY threads along rows, BX * BY == BLOCK, BY a power of two). Thread (tx, ty)
// owns CV consecutive channels (CV = VEC in bn_stats_inner_*, 1 in
// bn_stats_inner_scalar_*), so a warp reads BX * CV contiguous channels of
// 32 / BX rows: coalesced. blockIdx.x selects the channel group, blockIdx.y a
// range of `rows_per_block` rows; thread ty reads rows ty, ty + BY, ... of the
// range, a register tile of UNROLL rows (UNROLL * VEC with CV = 1: TileDepth). The
// BY threads of a channel are then merged through shared memory in a fixed
// tree. Partial (channel c, row block rb) goes to partial[c * gridDim.y + rb].
// ---------------------------------------------------------------------------

template <typename T, int CV>
__device__ __forceinline__ void stats_inner_body(const T* __restrict__ x, const View& v, const long long rows_per_block,
                                                 double* __restrict__ partial) {
    using A = typename Traits<T>::Acc;
    __shared__ A sh_n[BLOCK * CV];
    __shared__ A sh_mean[BLOCK * CV];
    __shared__ A sh_m2[BLOCK * CV];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int bx = blockDim.x, by = blockDim.y;
    const long long c0 = ((long long)blockIdx.x * bx + tx) * CV;
    const bool active = c0 < v.channels;
    const long long rb = blockIdx.y;
    const long long r_begin = rb * rows_per_block;
    const long long r_end = min(v.outer, r_begin + rows_per_block);
    constexpr int U = TileDepth<T, CV>::value;
    Welford<A> acc[CV];
#pragma unroll
    for (int k = 0; k < CV; ++k) acc[k] = welford_empty<A>();
    if (active) {
        const T* __restrict__ base = x + v.offset + c0 * v.channel_stride;
        long long r = r_begin + ty;
        while (r < r_end) {
            Pack<T, CV> vals[U];
            int cnt = 0;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (r < r_end) {
                    vals[u] = load_pack<T, CV>(base + r * v.outer_stride);
                    cnt = u + 1;
                }
                r += by;
            }
#pragma unroll
            for (int k = 0; k < CV; ++k) tile_moments<T, U, CV>(acc[k], vals, cnt, k);
        }
    }
    const int slot = (ty * bx + tx) * CV;
#pragma unroll
    for (int k = 0; k < CV; ++k) {
        sh_n[slot + k] = acc[k].n;
        sh_mean[slot + k] = acc[k].mean;
        sh_m2[slot + k] = acc[k].m2;
    }
    __syncthreads();
    for (int s = by / 2; s > 0; s >>= 1) {
        if (ty < s) {
            const int other = ((ty + s) * bx + tx) * CV;
#pragma unroll
            for (int k = 0; k < CV; ++k) {
                const Welford<A> a{sh_n[slot + k], sh_mean[slot + k], sh_m2[slot + k]};
                const Welford<A> b{sh_n[other + k], sh_mean[other + k], sh_m2[other + k]};
                const Welford<A> m = chan_merge(a, b);
                sh_n[slot + k] = m.n;
                sh_mean[slot + k] = m.mean;
                sh_m2[slot + k] = m.m2;
            }
        }
        __syncthreads();
    }
    if (ty == 0 && active) {
        const long long rbs = gridDim.y;
#pragma unroll
        for (int k = 0; k < CV; ++k) {
            const long long c = c0 + k;
            if (c < v.channels) {
                double* p = partial + (c * rbs + rb) * 3;
                p[0] = static_cast<double>(sh_n[slot + k]);
                p[1] = static_cast<double>(sh_mean[slot + k]);
                p[2] = static_cast<double>(sh_m2[slot + k]);
            }
        }
    }
}


#define STATS_KERNELS(T, SUFFIX)                                                                              \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                       \
        bn_stats_major_##SUFFIX(const T* __restrict__ x, const View v, const long long chunk_len,             \
                                const long long chunks, const int group, double* partial) {                   \
        stats_major<T, Traits<T>::VEC>(x, v, chunk_len, chunks, group, partial);                                        \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                       \
        bn_stats_major_scalar_##SUFFIX(const T* __restrict__ x, const View v, const long long chunk_len,      \
                                       const long long chunks, const int group, double* partial) {            \
        stats_major<T, 1>(x, v, chunk_len, chunks, group, partial);                                       \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                       \
        bn_stats_inner_##SUFFIX(const T* __restrict__ x, const View v, const long long rows_per_block,        \
                                double* partial) {                                                            \
        stats_inner_body<T, Traits<T>::VEC>(x, v, rows_per_block, partial);                                   \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                       \
        bn_stats_inner_scalar_##SUFFIX(const T* __restrict__ x, const View v, const long long rows_per_block, \
                                       double* partial) {                                                     \
        stats_inner_body<T, 1>(x, v, rows_per_block, partial);                                                \
    }

// 8-byte loads of 16-bit types (rows that are a multiple of 4 values, not of 8).
#define STATS_HALF_KERNELS(T, SUFFIX)                                                                    \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                  \
        bn_stats_major_half_##SUFFIX(const T* __restrict__ x, const View v, const long long chunk_len,   \
                                     const long long chunks, const int group, double* partial) {         \
        stats_major<T, Traits<T>::VEC / 2>(x, v, chunk_len, chunks, group, partial);                     \
    }

STATS_KERNELS(float, f32)
STATS_KERNELS(double, f64)
STATS_KERNELS(__half, f16)
STATS_KERNELS(__nv_bfloat16, bf16)
STATS_HALF_KERNELS(__half, f16)
STATS_HALF_KERNELS(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------
// Level 2: one warp per channel combines the channel's `parts` partials in f64
// (lane l takes partials l, l + 32, ... in order, then a fixed shuffle tree) and
// writes the (3, C) f64 output [count; n * mean; M2 + n * mean^2], contiguous.
// ---------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(BLOCK)
    bn_stats_combine(const double* __restrict__ partial, const long long channels, const long long parts,
                     double* __restrict__ out) {
    const long long c = (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (c >= channels) return;  // uniform per warp; no block barrier follows
    Welford<double> w = welford_empty<double>();
    for (long long k = lane; k < parts; k += WARP) {
        const double* p = partial + (c * parts + k) * 3;
        w = chan_merge(w, Welford<double>{p[0], p[1], p[2]});
    }
    w = warp_merge(w);
    if (lane == 0) {
        // Same roundings as the CPU path (no FMA contraction).
        const double s1 = __dmul_rn(w.n, w.mean);
        out[c] = w.n;
        out[channels + c] = s1;
        out[2 * channels + c] = __dadd_rn(w.m2, __dmul_rn(s1, w.mean));
    }
}

// ---------------------------------------------------------------------------
// Moments and running statistics: one thread per channel, f64, with the CPU
// path's operations and roundings (explicit _rn intrinsics: no contraction).
// ---------------------------------------------------------------------------

// One channel's mean and invstd.
struct ChannelMoments {
    double mean, invstd;
};

// One channel's moments from its (3, C) sums [n; Σx; Σx²] (any float dtype
// and strides), written to the (3, C) f64 [mean; invstd; n], contiguous, and
// returned.
__device__ __forceinline__ ChannelMoments moments_from_sums(const void* __restrict__ sums, const Mat2& s,
                                                            const long long channels, const long long c,
                                                            const double eps, double* __restrict__ out) {
    const double n = load_f64(sums, s.dtype, mat_index(s, 0, c));
    const double s1 = load_f64(sums, s.dtype, mat_index(s, 1, c));
    const double s2 = load_f64(sums, s.dtype, mat_index(s, 2, c));
    double mean = 0.0, invstd;
    if (n <= 0.0) {
        invstd = __ddiv_rn(1.0, __dsqrt_rn(eps));
    } else {
        mean = __ddiv_rn(s1, n);
        const double var = fmax(__dsub_rn(__ddiv_rn(s2, n), __dmul_rn(mean, mean)), 0.0);
        invstd = __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(var, eps)));
    }
    out[c] = mean;
    out[channels + c] = invstd;
    out[2 * channels + c] = n;
    return ChannelMoments{mean, invstd};
}

// (3, C) sums [n; Σx; Σx²] (any float dtype and strides) -> (3, C) f64
// [mean; invstd; n], contiguous. A kernel of its own only for the tests and
// benchmarks (`SYNCBN_TEST_KERNELS`, the `internals` feature): the layer
// computes the moments inside bn_batch_moments.
#ifdef SYNCBN_TEST_KERNELS
extern "C" __global__ void __launch_bounds__(BLOCK)
    bn_moments_from_sums(const void* __restrict__ sums, const Mat2 s, const long long channels, const double eps,
                         double* __restrict__ out) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    moments_from_sums(sums, s, channels, c, eps, out);
}
#endif

// (running_mean, running_var) (any float dtypes and strides) -> (3, C) f64
// [mean; 1/sqrt(var + eps); 0], contiguous; with `coef` (not null), the
// forward's coefficients of the normalization with weight and bias (see
// coef.cuh) in the accumulator dtype `coef_dt`, as bn_coef_normalize_* would
// compute them from the moments: eval's per-channel step in one launch.
extern "C" __global__ void __launch_bounds__(BLOCK)
    bn_moments_from_running(const void* __restrict__ mean_p, const Vec1 m, const void* __restrict__ var_p,
                            const Vec1 vv, const long long channels, const double eps, double* __restrict__ out,
                            const void* __restrict__ w, const Vec1 wv, const void* __restrict__ bias,
                            const Vec1 bv, void* __restrict__ coef, const int coef_dt) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const double mean = load_f64(mean_p, m.dtype, m.offset + c * m.stride);
    const double var = load_f64(var_p, vv.dtype, vv.offset + c * vv.stride);
    const double invstd = __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(var, eps)));
    out[c] = mean;
    out[channels + c] = invstd;
    out[2 * channels + c] = 0.0;
    write_forward_coef_dyn(coef, coef_dt, c, mean, invstd, w, wv, bias, bv);
}

// In place: dst[c] = (1 - f) * dst[c] + f * batch[c], where batch is the mean
// (stat == 0) or the unbiased variance (stat == 1) of the (3, C) sums.
__device__ __forceinline__ void running_update(void* __restrict__ dst, const Vec1& d, const void* __restrict__ sums,
                                               const Mat2& s, const long long c, const double factor,
                                               const int stat) {
    const double n = load_f64(sums, s.dtype, mat_index(s, 0, c));
    const double s1 = load_f64(sums, s.dtype, mat_index(s, 1, c));
    const double s2 = load_f64(sums, s.dtype, mat_index(s, 2, c));
    const double mean = __ddiv_rn(s1, n);
    double batch = mean;
    if (stat == 1) {
        const double var = fmax(__dsub_rn(__ddiv_rn(s2, n), __dmul_rn(mean, mean)), 0.0);
        batch = __ddiv_rn(__dmul_rn(var, n), __dsub_rn(n, 1.0));
    }
    const long long idx = d.offset + c * d.stride;
    const double old = load_f64(dst, d.dtype, idx);
    const double updated = __dadd_rn(__dmul_rn(__dsub_rn(1.0, factor), old), __dmul_rn(factor, batch));
    store_f64(dst, d.dtype, idx, updated);
}

// The update factor f: `momentum`, or 1 / max(count, 1) for the counter's
// value `count` after its increment (1 without a counter).
__device__ __forceinline__ double running_factor(const int has_momentum, const double momentum,
                                                 const double count) {
    return has_momentum ? momentum : __ddiv_rn(1.0, fmax(count, 1.0));
}

// running_update of every channel, with the factor of the counter as it is
// (already incremented; read here on the device: no host read). A kernel of
// its own only for the tests and benchmarks (`SYNCBN_TEST_KERNELS`): the
// layer updates the running statistics inside bn_batch_moments.
#ifdef SYNCBN_TEST_KERNELS
extern "C" __global__ void __launch_bounds__(BLOCK)
    bn_running_update(void* __restrict__ dst, const Vec1 d, const void* __restrict__ sums, const Mat2 s,
                      const void* __restrict__ counter, const Vec1 k, const long long channels,
                      const int has_momentum, const double momentum, const int stat) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const double count = k.present ? load_f64(counter, k.dtype, k.offset) : 1.0;
    running_update(dst, d, sums, s, c, running_factor(has_momentum, momentum, count), stat);
}
#endif

// Element `e` of the counter plus one, computed in the counter's dtype (i64,
// u32, f32 or f64) as bn_counter_increment computes it, returned as f64 and
// written when `write`.
__device__ __forceinline__ double counter_plus_one(void* __restrict__ p, const Vec1& v, const long long e,
                                                   const bool write) {
    const long long idx = v.offset + e * v.stride;
    switch (v.dtype) {
    case DT_I64: {
        const long long x = static_cast<long long*>(p)[idx] + 1;
        if (write) static_cast<long long*>(p)[idx] = x;
        return static_cast<double>(x);
    }
    case DT_U32: {
        const unsigned int x = static_cast<unsigned int*>(p)[idx] + 1u;
        if (write) static_cast<unsigned int*>(p)[idx] = x;
        return static_cast<double>(x);
    }
    case DT_F32: {
        const float x = static_cast<float*>(p)[idx] + 1.0f;
        if (write) static_cast<float*>(p)[idx] = x;
        return static_cast<double>(x);
    }
    case DT_F64: {
        const double x = static_cast<double*>(p)[idx] + 1.0;
        if (write) static_cast<double*>(p)[idx] = x;
        return x;
    }
    default: return 1.0;
    }
}

// The training forward's per-channel step in one launch: the counter's
// `counter_len` elements plus one, the (3, C) f64 moments of the sums (as
// bn_moments_from_sums), and both running statistics updated in place (as
// bn_running_update, with the factor of the incremented counter). Without
// running statistics (`mean_p` null) the moments alone; without a counter
// (k.present 0) the factor of a count of 1. With `coef` (not null), also the
// forward's coefficients (see bn_moments_from_running).
// Grid: where the factor reads the counter (a cumulative average: no
// momentum), ONE block, so that every thread reads the counter before block 0
// writes it; otherwise nothing reads it and a thread per channel runs over as
// many blocks as the channels need (one block of 256 threads took 31 us for
// 2048 channels on an H200, a chain of dependent loads per channel).
extern "C" __global__ void __launch_bounds__(BLOCK)
    bn_batch_moments(const void* __restrict__ sums, const Mat2 s, void* __restrict__ mean_p, const Vec1 m,
                     void* __restrict__ var_p, const Vec1 vv, void* __restrict__ counter, const Vec1 k,
                     const long long counter_len, const long long channels, const int has_momentum,
                     const double momentum, const double eps, double* __restrict__ out,
                     const void* __restrict__ w, const Vec1 wv, const void* __restrict__ bias, const Vec1 bv,
                     void* __restrict__ coef, const int coef_dt) {
    const double count = k.present && !has_momentum ? counter_plus_one(counter, k, 0, false) : 1.0;
    __syncthreads();  // every read of the counter comes before its write
    if (k.present && blockIdx.x == 0)
        for (long long e = threadIdx.x; e < counter_len; e += blockDim.x) counter_plus_one(counter, k, e, true);
    const double factor = running_factor(has_momentum, momentum, count);
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < channels;
         c += (long long)gridDim.x * blockDim.x) {
        const ChannelMoments cm = moments_from_sums(sums, s, channels, c, eps, out);
        write_forward_coef_dyn(coef, coef_dt, c, cm.mean, cm.invstd, w, wv, bias, bv);
        if (mean_p != nullptr) {
            running_update(mean_p, m, sums, s, c, factor, 0);
            running_update(var_p, vv, sums, s, c, factor, 1);
        }
    }
}

// In place: every element of the counter (i64, u32, f32 or f64) plus one.
extern "C" __global__ void __launch_bounds__(BLOCK)
    bn_counter_increment(void* __restrict__ p, const Vec1 v, const long long len) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= len) return;
    const long long idx = v.offset + e * v.stride;
    switch (v.dtype) {
    case DT_I64: static_cast<long long*>(p)[idx] += 1; break;
    case DT_U32: static_cast<unsigned int*>(p)[idx] += 1u; break;
    case DT_F32: static_cast<float*>(p)[idx] += 1.0f; break;
    case DT_F64: static_cast<double*>(p)[idx] += 1.0; break;
    default: break;
    }
}
