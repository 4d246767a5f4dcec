// Backward reductions of SyncBatchNorm: per-channel Σdy and Σdy·(x − mean)
// (two levels, deterministic, like stats.cu) and the weight/bias gradients
// (from the second level itself, bn_grad_combine_affine, or on their own).
// After a fused ReLU, the *_relu_* kernels take the forward's coefficients
// (bn_coef_normalize_*, COEF per channel) and mask dy where the forward's
// output, recomputed from x, was not positive. They are entry points of their
// own so that the plain kernels keep their register use (one kernel with both
// paths takes the registers of the larger: 127 -> 150 for bn_grad_inner_bf16
// on sm_90, one block per SM instead of two).
// See src/ops/grad_stats.rs and affine_grads.rs for the Rust side.
#include "dtype.cuh"
#include "reduce.cuh"
#include "tile.cuh"
#include "view.cuh"

using namespace syncbn;

// The channel mean as an f64 split into hi + lo of the accumulator type, so
// (x − hi) − lo keeps the precision of x − mean for large means (lo == 0 for f64).
template <typename A> struct SplitMean {
    A hi, lo;
};

template <typename A>
__device__ __forceinline__ SplitMean<A> split_mean(const void* __restrict__ moments, const Mat2& m, long long c) {
    const double mean = load_f64(moments, m.dtype, mat_index(m, 0, c));
    const A hi = static_cast<A>(mean);
    const A lo = static_cast<A>(mean - static_cast<double>(hi));
    return SplitMean<A>{hi, lo};
}

// ---------------------------------------------------------------------------
// Level 1, channel-major path: the same work split as bn_stats_major_* (see
// stats.cu): tasks (channel, chunk) handled by a block or by a warp; dy and x
// share sizes and are addressed through their own strides. Each thread sums a
// register tile of UNROLL vectors, adds the tile sums to its f32 (f64 for f64)
// sums (a tile of VEC times as many scalars without vectors: TileDepth), and
// the group adds its threads in a fixed tree. Task t writes
// partial[t] = (Σdy, Σdy·(x − mean)).
// ---------------------------------------------------------------------------

// dy of one element, masked by a fused ReLU when RELU (mb, mk: the forward's
// scale and shift of the centered input `xc`).
template <typename T, bool RELU>
__device__ __forceinline__ typename Traits<T>::Acc masked_grad(typename Traits<T>::Acc g, typename Traits<T>::Acc xc,
                                                               typename Traits<T>::Acc mb,
                                                               typename Traits<T>::Acc mk) {
    using A = typename Traits<T>::Acc;
    if (RELU && !relu_passes<T>(affine_rn(xc, mb, mk))) return A(0);
    return g;
}

template <typename T, int W, bool RELU>
__device__ __forceinline__ void grad_major_thread(const T* __restrict__ dy, const View& dv, const T* __restrict__ x,
                                                  const View& xv, long long c, long long j, const long long j1,
                                                  const long long step, const SplitMean<typename Traits<T>::Acc> mu,
                                                  const typename Traits<T>::Acc mb, const typename Traits<T>::Acc mk,
                                                  typename Traits<T>::Acc& s, typename Traits<T>::Acc& q) {
    using A = typename Traits<T>::Acc;
    if (j >= j1) return;
    const T* __restrict__ dbase = dy + dv.offset + c * dv.channel_stride;
    const T* __restrict__ xbase = x + xv.offset + c * xv.channel_stride;
    PlanePos pos{j / xv.inner, j % xv.inner};
    const PlaneStep st = plane_step(step, xv.inner);
    constexpr int U = TileDepth<T, W>::value;
    while (j < j1) {
        // Kept in T, converted where used (two f16/bf16 values per register).
        Pack<T, W> g[U], e[U];
        int cnt = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (j < j1) {
                g[u] = load_pack<T, W>(dbase + pos.o * dv.outer_stride + pos.i * dv.inner_stride);
                e[u] = load_pack<T, W>(xbase + pos.o * xv.outer_stride + pos.i * xv.inner_stride);
                cnt = u + 1;
            }
            j += step;
            plane_advance(pos, st, xv.inner);
        }
        A ts = A(0), tq = A(0);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (u < cnt) {
#pragma unroll
                for (int k = 0; k < W; ++k) {
                    const A xc = (acc_at(e[u], k) - mu.hi) - mu.lo;
                    const A gv = masked_grad<T, RELU>(acc_at(g[u], k), xc, mb, mk);
                    ts += gv;
                    tq += gv * xc;
                }
            }
        }
        s += ts;
        q += tq;
    }
}

// W values per load: VEC (128 bits: bn_grad_major_*, bn_grad_relu_major_*),
// VEC / 2 (8 bytes of f16/bf16: the *_major_half_* entry points) or 1 (the
// *_major_scalar_* entry points); see bn_stats_major_* in stats.cu.
template <typename T, bool RELU, int W>
__device__ __forceinline__ void grad_major(const T* __restrict__ dy, const View dv, const T* __restrict__ x,
                                           const View xv, const void* __restrict__ moments, const Mat2 m,
                                           const typename Traits<T>::Acc* __restrict__ relu,
                                           const long long chunk_len, const long long chunks, const int group,
                                           double* __restrict__ partial) {
    using A = typename Traits<T>::Acc;
    const int tasks_per_block = blockDim.x / group;
    const long long task = (long long)blockIdx.x * tasks_per_block + threadIdx.x / group;
    const int g = threadIdx.x % group;
    const long long total = xv.channels * chunks;
    const long long plane = xv.outer * xv.inner;
    A s = A(0), q = A(0);
    if (task < total) {
        const long long c = task / chunks;
        const long long k = task % chunks;
        const long long j0 = k * chunk_len;
        const long long j1 = min(plane, j0 + chunk_len);
        const SplitMean<A> mu = split_mean<A>(moments, m, c);
        const long long jv = j0 + (long long)g * W, sv = (long long)group * W;
        const A mb = RELU ? relu[c * COEF + 2] : A(0), mk = RELU ? relu[c * COEF + 3] : A(0);
        grad_major_thread<T, W, RELU>(dy, dv, x, xv, c, jv, j1, sv, mu, mb, mk, s, q);
    }
    if (group == WARP) {
        s = warp_sum(s);
        q = warp_sum(q);
    } else {
        __shared__ A sh_s[WARP];
        __shared__ A sh_q[WARP];
        block_sum2(s, q, sh_s, sh_q);
    }
    if (g == 0 && task < total) {
        partial[task * 2] = static_cast<double>(s);
        partial[task * 2 + 1] = static_cast<double>(q);
    }
}

// ---------------------------------------------------------------------------
// Level 1, channel-innermost path: the work split of bn_stats_inner_* (see
// stats.cu): 2-D blocks, CV channels per thread along x (VEC in
// bn_grad_inner_*, 1 in bn_grad_inner_scalar_*, with tiles TileDepth rows
// deep), rows along y, the BY row-threads of a channel added in a fixed
// shared-memory tree. Partial (channel c, row block rb) goes to
// partial[c * gridDim.y + rb].
// ---------------------------------------------------------------------------

template <typename T, int CV, bool RELU>
__device__ __forceinline__ void grad_inner_body(const T* __restrict__ dy, const View& dv, const T* __restrict__ x,
                                                const View& xv, const void* __restrict__ moments, const Mat2& m,
                                                const typename Traits<T>::Acc* __restrict__ relu,
                                                const long long rows_per_block, double* __restrict__ partial) {
    using A = typename Traits<T>::Acc;
    __shared__ A sh_s[BLOCK * CV];
    __shared__ A sh_q[BLOCK * CV];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int bx = blockDim.x, by = blockDim.y;
    const long long c0 = ((long long)blockIdx.x * bx + tx) * CV;
    const bool active = c0 < xv.channels;
    const long long rb = blockIdx.y;
    const long long r_begin = rb * rows_per_block;
    const long long r_end = min(xv.outer, r_begin + rows_per_block);
    A s[CV], q[CV];
#pragma unroll
    for (int k = 0; k < CV; ++k) s[k] = q[k] = A(0);
    if (active) {
        SplitMean<A> mu[CV];
        A mb[CV], mk[CV];
#pragma unroll
        for (int k = 0; k < CV; ++k) {
            const bool in = c0 + k < xv.channels;
            mu[k] = in ? split_mean<A>(moments, m, c0 + k) : SplitMean<A>{A(0), A(0)};
            mb[k] = RELU && in ? relu[(c0 + k) * COEF + 2] : A(0);
            mk[k] = RELU && in ? relu[(c0 + k) * COEF + 3] : A(0);
        }
        const T* __restrict__ dbase = dy + dv.offset + c0 * dv.channel_stride;
        const T* __restrict__ xbase = x + xv.offset + c0 * xv.channel_stride;
        long long r = r_begin + ty;
        constexpr int U = TileDepth<T, CV>::value;
        while (r < r_end) {
            Pack<T, CV> g[U], e[U];
            int cnt = 0;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (r < r_end) {
                    if (CV == 1) {
                        // Scalar path: channel strides may differ (e.g. a broadcast dy).
                        g[u].v[0] = dbase[r * dv.outer_stride];
                        e[u].v[0] = xbase[r * xv.outer_stride];
                    } else {
                        g[u] = load_pack<T, CV>(dbase + r * dv.outer_stride);
                        e[u] = load_pack<T, CV>(xbase + r * xv.outer_stride);
                    }
                    cnt = u + 1;
                }
                r += by;
            }
#pragma unroll
            for (int k = 0; k < CV; ++k) {
                A ts = A(0), tq = A(0);
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    if (u < cnt) {
                        const A xc = (acc_at(e[u], k) - mu[k].hi) - mu[k].lo;
                        const A gv = masked_grad<T, RELU>(acc_at(g[u], k), xc, mb[k], mk[k]);
                        ts += gv;
                        tq += gv * xc;
                    }
                }
                s[k] += ts;
                q[k] += tq;
            }
        }
    }
    const int slot = (ty * bx + tx) * CV;
#pragma unroll
    for (int k = 0; k < CV; ++k) {
        sh_s[slot + k] = s[k];
        sh_q[slot + k] = q[k];
    }
    __syncthreads();
    for (int h = by / 2; h > 0; h >>= 1) {
        if (ty < h) {
            const int other = ((ty + h) * bx + tx) * CV;
#pragma unroll
            for (int k = 0; k < CV; ++k) {
                sh_s[slot + k] += sh_s[other + k];
                sh_q[slot + k] += sh_q[other + k];
            }
        }
        __syncthreads();
    }
    if (ty == 0 && active) {
        const long long rbs = gridDim.y;
#pragma unroll
        for (int k = 0; k < CV; ++k) {
            const long long c = c0 + k;
            if (c < xv.channels) {
                partial[(c * rbs + rb) * 2] = static_cast<double>(sh_s[slot + k]);
                partial[(c * rbs + rb) * 2 + 1] = static_cast<double>(sh_q[slot + k]);
            }
        }
    }
}

// (2, C) weight and bias gradients in T from the (2, C) sums and (3, C) moments:
// [Σdy·(x − mean)·invstd; Σdy], contiguous. One thread per channel.
template <typename T>
__device__ __forceinline__ void affine_grads(const void* __restrict__ sums, const Mat2& s,
                                             const void* __restrict__ moments, const Mat2& m,
                                             const long long channels, T* __restrict__ out) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const double sum_dy = load_f64(sums, s.dtype, mat_index(s, 0, c));
    const double sum_dyx = load_f64(sums, s.dtype, mat_index(s, 1, c));
    const double invstd = load_f64(moments, m.dtype, mat_index(m, 1, c));
    out[c] = Traits<T>::from_f64(__dmul_rn(sum_dyx, invstd));
    out[channels + c] = Traits<T>::from_f64(sum_dy);
}

#define GRAD_MAJOR_KERNELS(T, SUFFIX, NAME, W)                                                                 \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                        \
        bn_grad_##NAME##SUFFIX(const T* __restrict__ dy, const View dv, const T* __restrict__ x, const View xv, \
                               const void* __restrict__ moments, const Mat2 m, const long long chunk_len,      \
                               const long long chunks, const int group, double* partial) {                     \
        grad_major<T, false, W>(dy, dv, x, xv, moments, m, nullptr, chunk_len, chunks, group, partial);        \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK) bn_grad_relu_##NAME##SUFFIX(                           \
        const T* __restrict__ dy, const View dv, const T* __restrict__ x, const View xv,                      \
        const void* __restrict__ moments, const Mat2 m, const typename Traits<T>::Acc* __restrict__ relu,     \
        const long long chunk_len, const long long chunks, const int group, double* partial) {                \
        grad_major<T, true, W>(dy, dv, x, xv, moments, m, relu, chunk_len, chunks, group, partial);            \
    }

#define GRAD_INNER_KERNELS(T, SUFFIX, NAME, CV)                                                                \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                        \
        bn_grad_##NAME##SUFFIX(const T* __restrict__ dy, const View dv, const T* __restrict__ x, const View xv, \
                               const void* __restrict__ moments, const Mat2 m, const long long rows_per_block, \
                               double* partial) {                                                              \
        grad_inner_body<T, CV, false>(dy, dv, x, xv, moments, m, nullptr, rows_per_block, partial);            \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK) bn_grad_relu_##NAME##SUFFIX(                           \
        const T* __restrict__ dy, const View dv, const T* __restrict__ x, const View xv,                      \
        const void* __restrict__ moments, const Mat2 m, const typename Traits<T>::Acc* __restrict__ relu,     \
        const long long rows_per_block, double* partial) {                                                    \
        grad_inner_body<T, CV, true>(dy, dv, x, xv, moments, m, relu, rows_per_block, partial);                \
    }

#define GRAD_KERNELS(T, SUFFIX)                                                                                \
    GRAD_MAJOR_KERNELS(T, SUFFIX, major_, Traits<T>::VEC)                                                      \
    GRAD_MAJOR_KERNELS(T, SUFFIX, major_scalar_, 1)                                                            \
    GRAD_INNER_KERNELS(T, SUFFIX, inner_, Traits<T>::VEC)                                                      \
    GRAD_INNER_KERNELS(T, SUFFIX, inner_scalar_, 1)                                                            \
    AFFINE_GRADS_KERNEL(T, SUFFIX)

// The affine gradients as a kernel of their own: only the tests and the
// benchmarks launch it (`SYNCBN_TEST_KERNELS`, the `internals` feature); the
// layer computes them inside bn_grad_combine_affine.
#ifdef SYNCBN_TEST_KERNELS
#define AFFINE_GRADS_KERNEL(T, SUFFIX)                                                                         \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                        \
        bn_affine_grads_##SUFFIX(const void* __restrict__ sums, const Mat2 s, const void* __restrict__ moments, \
                                 const Mat2 m, const long long channels, T* __restrict__ out) {                \
        affine_grads<T>(sums, s, moments, m, channels, out);                                                   \
    }
#else
#define AFFINE_GRADS_KERNEL(T, SUFFIX)
#endif

GRAD_KERNELS(float, f32)
GRAD_KERNELS(double, f64)
GRAD_KERNELS(__half, f16)
GRAD_KERNELS(__nv_bfloat16, bf16)
// 8-byte loads of 16-bit types (rows that are a multiple of 4 values, not of 8).
GRAD_MAJOR_KERNELS(__half, f16, major_half_, 4)
GRAD_MAJOR_KERNELS(__nv_bfloat16, bf16, major_half_, 4)

// Level 2: one warp per channel adds the channel's `parts` partials in f64 in a
// fixed order (lane l takes l, l + 32, ..., then a shuffle tree) and writes the
// (2, C) f64 output [Σdy; Σdy·(x − mean)], contiguous. With AFFINE, lane 0 also
// writes the weight and bias gradients [Σdy·(x − mean)·invstd; Σdy] (what
// bn_affine_grads_* computes from the output, with the same roundings) to the
// (2, C) view `am` of `affine`, any float dtype: one launch instead of two.
template <bool AFFINE>
__device__ __forceinline__ void grad_combine(const double* __restrict__ partial, const long long channels,
                                             const long long parts, double* __restrict__ out,
                                             const void* __restrict__ moments, const Mat2& m,
                                             void* __restrict__ affine, const Mat2& am) {
    const long long c = (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (c >= channels) return;  // uniform per warp; no block barrier follows
    double s = 0.0, q = 0.0;
    for (long long k = lane; k < parts; k += WARP) {
        s += partial[(c * parts + k) * 2];
        q += partial[(c * parts + k) * 2 + 1];
    }
    s = warp_sum(s);
    q = warp_sum(q);
    if (lane == 0) {
        out[c] = s;
        out[channels + c] = q;
        if (AFFINE) {
            const double invstd = load_f64(moments, m.dtype, mat_index(m, 1, c));
            store_f64(affine, am.dtype, mat_index(am, 0, c), __dmul_rn(q, invstd));
            store_f64(affine, am.dtype, mat_index(am, 1, c), s);
        }
    }
}

extern "C" __global__ void __launch_bounds__(BLOCK)
    bn_grad_combine(const double* __restrict__ partial, const long long channels, const long long parts,
                    double* __restrict__ out) {
    grad_combine<false>(partial, channels, parts, out, nullptr, Mat2{}, nullptr, Mat2{});
}

extern "C" __global__ void __launch_bounds__(BLOCK)
    bn_grad_combine_affine(const double* __restrict__ partial, const long long channels, const long long parts,
                           double* __restrict__ out, const void* __restrict__ moments, const Mat2 m,
                           void* __restrict__ affine, const Mat2 am) {
    grad_combine<true>(partial, channels, parts, out, moments, m, affine, am);
}
