// Element-wise passes of SyncBatchNorm: normalization (forward, optionally
// plus a residual z and followed by a fused ReLU) and the input gradient (backward), both of the form
//     out = dy * a + ((x − hi) − lo) * b + k     (per channel; no dy term forward)
// with per-channel coefficients prepared once by a small kernel in f64 and
// rounded to the accumulator type; and the gradient mask of the fused ReLU,
//     out = y <= 0 ? 0 : dy.
// The input gradient of a fused ReLU (without residual) masks dy itself,
// recomputing the forward's output from x (see relu_passes in dtype.cuh).
// See src/ops/batch_norm.rs, input_grad.rs and relu_grad.rs.
#include "coef.cuh"
#include "dtype.cuh"
#include "tile.cuh"
#include "view.cuh"

using namespace syncbn;

// ---------------------------------------------------------------------------
// Coefficient kernels: one thread per channel, f64 with the CPU path's
// operations (explicit _rn intrinsics: no contraction), rounded to A.
// ---------------------------------------------------------------------------

// Forward: the coefficients of coef.cuh (b = invstd * weight, k = bias, a = 0).
template <typename A>
__device__ __forceinline__ void coef_normalize(const void* __restrict__ moments, const Mat2& m,
                                               const void* __restrict__ w, const Vec1& wv,
                                               const void* __restrict__ bias, const Vec1& bv,
                                               const long long channels, A* __restrict__ coef) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const double mean = load_f64(moments, m.dtype, mat_index(m, 0, c));
    const double invstd = load_f64(moments, m.dtype, mat_index(m, 1, c));
    write_forward_coef<A>(coef, c, mean, invstd, w, wv, bias, bv);
}

// Backward: a = w·invstd; with the global sums g = [Σdy; Σdy·(x − mean)] over
// n = max(count, 1): b = −w·invstd³·g1/n, k = −a·g0/n; without: b = k = 0.
// With `relu`, the forward's coefficients invstd·rw and rbias (the fused
// ReLU's weight and bias, computed as coef_normalize computes them) follow,
// for its mask.
template <typename A>
__device__ __forceinline__ void coef_input_grad(const void* __restrict__ moments, const Mat2& m,
                                                const void* __restrict__ w, const Vec1& wv,
                                                const void* __restrict__ g, const Mat2& gm,
                                                const void* __restrict__ rw, const Vec1& rwv,
                                                const void* __restrict__ rbias, const Vec1& rbv, const int relu,
                                                const long long channels, A* __restrict__ coef) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const double mean = load_f64(moments, m.dtype, mat_index(m, 0, c));
    const double invstd = load_f64(moments, m.dtype, mat_index(m, 1, c));
    const double weight = wv.present ? load_f64(w, wv.dtype, wv.offset + c * wv.stride) : 1.0;
    const double a = __dmul_rn(weight, invstd);
    double b = 0.0, k = 0.0;
    if (gm.present) {
        const double n = fmax(load_f64(moments, m.dtype, mat_index(m, 2, c)), 1.0);
        const double g0 = load_f64(g, gm.dtype, mat_index(gm, 0, c));
        const double g1 = load_f64(g, gm.dtype, mat_index(gm, 1, c));
        // -w * invstd * invstd * invstd * g1 / n, left to right as on the CPU.
        b = __ddiv_rn(__dmul_rn(__dmul_rn(__dmul_rn(__dmul_rn(-weight, invstd), invstd), invstd), g1), n);
        k = __ddiv_rn(__dmul_rn(-a, g0), n);
    }
    if (relu) {
        const double mw = rwv.present ? load_f64(rw, rwv.dtype, rwv.offset + c * rwv.stride) : 1.0;
        const double shift = rbv.present ? load_f64(rbias, rbv.dtype, rbv.offset + c * rbv.stride) : 0.0;
        write_coef<A>(coef, c, mean, b, k, a, __dmul_rn(invstd, mw), shift);
    } else {
        write_coef<A>(coef, c, mean, b, k, a);
    }
}

#define COEF_KERNELS(A, SUFFIX)                                                                              \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                      \
        bn_coef_normalize_##SUFFIX(const void* __restrict__ moments, const Mat2 m, const void* __restrict__ w, \
                                   const Vec1 wv, const void* __restrict__ bias, const Vec1 bv,               \
                                   const long long channels, A* __restrict__ coef) {                         \
        coef_normalize<A>(moments, m, w, wv, bias, bv, channels, coef);                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(BLOCK) bn_coef_input_grad_##SUFFIX(                          \
        const void* __restrict__ moments, const Mat2 m, const void* __restrict__ w, const Vec1 wv,           \
        const void* __restrict__ g, const Mat2 gm, const void* __restrict__ rw, const Vec1 rwv,              \
        const void* __restrict__ rbias, const Vec1 rbv, const int relu, const long long channels,            \
        A* __restrict__ coef) {                                                                              \
        coef_input_grad<A>(moments, m, w, wv, g, gm, rw, rwv, rbias, rbv, relu, channels, coef);             \
    }

COEF_KERNELS(float, f32)
COEF_KERNELS(double, f64)

// [weight; bias] as one contiguous (2, C) tensor of dtype `out_dt` (the third
// input of the op with a residual), one thread per channel; values pass
// through f64, exactly for the float dtypes, and are rounded once to out_dt.
extern "C" __global__ void __launch_bounds__(BLOCK)
    bn_stack_params(const void* __restrict__ w, const Vec1 wv, const void* __restrict__ b, const Vec1 bv,
                    void* __restrict__ out, const int out_dt, const long long channels) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    store_f64(out, out_dt, c, load_f64(w, wv.dtype, wv.offset + c * wv.stride));
    store_f64(out, out_dt, channels + c, load_f64(b, bv.dtype, bv.offset + c * bv.stride));
}

// ---------------------------------------------------------------------------
// Element-wise kernel.
//
// Work split: a grid-stride loop over the elements of the (outer, channels,
// inner) view in row-major order, W elements per thread and step; the grid is
// sized by the host to fill the GPU once (the kernel's resident blocks per SM,
// from the driver's occupancy figure, on every SM: one wave), whatever the
// shape, so few-channel/large-spatial and many-channel/tiny-spatial inputs
// alike keep every SM busy. The (o, c, i) position of a thread is computed once
// and then advanced by the fixed grid stride with carries (no divisions in the
// loop). `mode` (chosen by the host from strides, sizes and alignment):
//   0: scalar (W = 1), any strides;
//   1: W = VEC consecutive elements along `inner` (inner_stride == 1 for every
//      view, inner % VEC == 0): one 128-bit load/store, one channel;
//   2: W = VEC consecutive channels (channel-innermost: inner == 1,
//      channel_stride == 1 for every view, channels % VEC == 0);
//   3: W = VEC consecutive elements in memory order, across rows: every view
//      dense in (outer, channels, inner) order, inner >= VEC and the element
//      count a multiple of VEC (rows of 7x7 maps, whose length is no multiple
//      of VEC). A vector then spans at most two channels: the coefficients of
//      both are loaded once per vector and each element takes its own.
// Outputs are written through their own view (contiguous in x's shape).
// KIND picks the pass: the normalization (no dy; with `relu`, max(·, 0) in the
// accumulator type before rounding; NaN stays NaN), the normalization plus a
// residual (read through the dy slot and added after the affine transform),
// the input gradient (with `relu`, dy is first masked where the forward's
// output, recomputed from x with the coefficients' mb and mk, was not
// positive), or the ReLU mask (x is then the forward's output y; no
// coefficients).
// ---------------------------------------------------------------------------

enum Kind { NORMALIZE = 0, INPUT_GRAD = 1, RELU_GRAD = 2, NORMALIZE_ADD = 3 };

// Vector layouts of elemt_body (the `mode` values above).
enum Along { SCALAR = 0, ALONG_INNER = 1, ALONG_CHANNELS = 2, ACROSS_ROWS = 3 };

// One channel's coefficients as two packs: hi, lo, b, k and a, mb, mk, (pad).
template <typename A> struct Coef {
    Pack<A, 4> n, g;
};

template <typename A> __device__ __forceinline__ Coef<A> load_coef(const A* __restrict__ coef, long long c) {
    const Pack<A, 4>* p = reinterpret_cast<const Pack<A, 4>*>(coef + c * COEF);
    return Coef<A>{p[0], p[1]};
}

// elemt_body along the channels when the grid's stride is a multiple of the
// channel count: the coefficients of the thread's W channels are loaded before
// the loop (the forward's four values only when no pass needs the rest), and
// each step is a load, the arithmetic of elemt_body, a store.
template <typename T, int KIND, int W>
__device__ __forceinline__ void elemt_fixed_channels(const T* __restrict__ dy, const View& dv,
                                                     const T* __restrict__ x, const View& xv, T* __restrict__ out,
                                                     const View& ov,
                                                     const typename Traits<T>::Acc* __restrict__ coef,
                                                     const int relu, long long p, TensorPos pos,
                                                     const TensorPos& st, const long long total,
                                                     const long long step) {
    using A = typename Traits<T>::Acc;
    const long long channels = xv.channels, inner = xv.inner;
    constexpr bool GRAD = KIND == INPUT_GRAD;
    Pack<A, 4> n[W], g[GRAD ? W : 1];
#pragma unroll
    for (int k = 0; k < W; ++k) {
        const Pack<A, 4>* cp = reinterpret_cast<const Pack<A, 4>*>(coef + (pos.c + k) * COEF);
        n[k] = cp[0];
        if (GRAD) g[GRAD ? k : 0] = cp[1];
    }
    for (; p < total; p += step) {
        A xs[W], d[W], r[W];
        load_acc<T, W>(x + view_index(xv, pos.o, pos.c, pos.i), xs);
        if (KIND != NORMALIZE) load_acc<T, W>(dy + view_index(dv, pos.o, pos.c, pos.i), d);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const A centered = (xs[k] - n[k].v[0]) - n[k].v[1];
            if (GRAD) {
                const Pack<A, 4>& gk = g[GRAD ? k : 0];
                A gv = d[k];
                if (relu && !relu_passes<T>(affine_rn(centered, gk.v[1], gk.v[2]))) gv = A(0);
                r[k] = gv * gk.v[0] + centered * n[k].v[2] + n[k].v[3];
            } else {
                r[k] = affine_rn(centered, n[k].v[2], n[k].v[3]);
                if (KIND == NORMALIZE_ADD) r[k] = r[k] + d[k];
                if (relu && r[k] < A(0)) r[k] = A(0);
            }
        }
        store_acc<T, W>(out + view_index(ov, pos.o, pos.c, pos.i), r);
        tensor_advance(pos, st, channels, inner);
    }
}

template <typename T, int KIND, int W, int ALONG>
__device__ __forceinline__ void elemt_body(const T* __restrict__ dy, const View& dv, const T* __restrict__ x,
                                           const View& xv, T* __restrict__ out, const View& ov,
                                           const typename Traits<T>::Acc* __restrict__ coef, const int relu) {
    using A = typename Traits<T>::Acc;
    const long long channels = xv.channels, inner = xv.inner;
    const long long total = xv.outer * channels * inner;
    const long long step = (long long)gridDim.x * blockDim.x * W;
    long long p = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * W;
    if (p >= total) return;
    TensorPos pos = tensor_pos(p, channels, inner);
    const TensorPos st = tensor_pos(step, channels, inner);
    for (; p < total; p += step) {
        A xs[W], g[W], r[W];
        load_acc<T, W>(x + view_index(xv, pos.o, pos.c, pos.i), xs);
        if (KIND != NORMALIZE) load_acc<T, W>(dy + view_index(dv, pos.o, pos.c, pos.i), g);
        // ACROSS_ROWS: the vector's first channel and the next one (the first
        // channel again after the last: the next row of the batch).
        Coef<A> first, next;
        if (ALONG == ACROSS_ROWS && KIND != RELU_GRAD) {
            first = load_coef(coef, pos.c);
            next = load_coef(coef, pos.c + 1 == channels ? 0 : pos.c + 1);
        }
#pragma unroll
        for (int k = 0; k < W; ++k) {
            if (KIND == RELU_GRAD) {
                r[k] = xs[k] <= A(0) ? A(0) : g[k];
                continue;
            }
            Coef<A> cf;
            if (ALONG == ACROSS_ROWS)
                cf = pos.i + k < inner ? first : next;
            else
                cf = load_coef(coef, ALONG == ALONG_CHANNELS ? pos.c + k : pos.c);
            const A centered = (xs[k] - cf.n.v[0]) - cf.n.v[1];
            if (KIND == INPUT_GRAD) {
                A gv = g[k];
                if (relu && !relu_passes<T>(affine_rn(centered, cf.g.v[1], cf.g.v[2]))) gv = A(0);
                r[k] = gv * cf.g.v[0] + centered * cf.n.v[2] + cf.n.v[3];
            } else {
                r[k] = affine_rn(centered, cf.n.v[2], cf.n.v[3]);
                if (KIND == NORMALIZE_ADD) r[k] = r[k] + g[k];
                if (relu && r[k] < A(0)) r[k] = A(0);
            }
        }
        store_acc<T, W>(out + view_index(ov, pos.o, pos.c, pos.i), r);
        tensor_advance(pos, st, channels, inner);
    }
}

// The `_rows` entries: vectors along the channels (mode 2) with a grid whose
// stride is a multiple of the channel count (plan::elementwise_kernel picks
// them then), so that each thread keeps its channels and loads their
// coefficients once (elemt_fixed_channels). Entries of their own: the hoisted
// coefficients take registers (105 instead of 64 in bn_input_grad_bf16) that
// would halve the other modes' occupancy. Any other grid takes elemt_body's
// loop, with the same results.
template <typename T, int KIND>
__device__ __forceinline__ void elemt_rows(const T* __restrict__ dy, const View& dv, const T* __restrict__ x,
                                           const View& xv, T* __restrict__ out, const View& ov,
                                           const typename Traits<T>::Acc* __restrict__ coef, const int relu) {
    constexpr int V = Traits<T>::VEC;
    const long long channels = xv.channels, inner = xv.inner;
    const long long total = xv.outer * channels * inner;
    const long long step = (long long)gridDim.x * blockDim.x * V;
    const long long p = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (p >= total) return;
    const TensorPos st = tensor_pos(step, channels, inner);
    if (st.c != 0 || inner != 1) {
        elemt_body<T, KIND, V, ALONG_CHANNELS>(dy, dv, x, xv, out, ov, coef, relu);
        return;
    }
    elemt_fixed_channels<T, KIND, V>(dy, dv, x, xv, out, ov, coef, relu, p, tensor_pos(p, channels, inner), st,
                                     total, step);
}

template <typename T, int KIND>
__device__ __forceinline__ void elemt(const T* __restrict__ dy, const View& dv, const T* __restrict__ x,
                                      const View& xv, T* __restrict__ out, const View& ov,
                                      const typename Traits<T>::Acc* __restrict__ coef, const int mode,
                                      const int relu) {
    constexpr int V = Traits<T>::VEC;
    if (mode == ALONG_INNER)
        elemt_body<T, KIND, V, ALONG_INNER>(dy, dv, x, xv, out, ov, coef, relu);
    else if (mode == ALONG_CHANNELS)
        elemt_body<T, KIND, V, ALONG_CHANNELS>(dy, dv, x, xv, out, ov, coef, relu);
    else if (mode == ACROSS_ROWS)
        elemt_body<T, KIND, V, ACROSS_ROWS>(dy, dv, x, xv, out, ov, coef, relu);
    else
        elemt_body<T, KIND, 1, SCALAR>(dy, dv, x, xv, out, ov, coef, relu);
}

#define ELEMT_KERNELS(T, SUFFIX)                                                                               \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                        \
        bn_normalize_##SUFFIX(const T* __restrict__ x, const View xv, T* __restrict__ out, const View ov,      \
                              const typename Traits<T>::Acc* __restrict__ coef, const int mode,                \
                              const int relu) {                                                                \
        elemt<T, NORMALIZE>(nullptr, xv, x, xv, out, ov, coef, mode, relu);                                    \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                        \
        bn_normalize_add_##SUFFIX(const T* __restrict__ z, const View zv, const T* __restrict__ x, const View xv, \
                                  T* __restrict__ out, const View ov,                                          \
                                  const typename Traits<T>::Acc* __restrict__ coef, const int mode,            \
                                  const int relu) {                                                            \
        elemt<T, NORMALIZE_ADD>(z, zv, x, xv, out, ov, coef, mode, relu);                                      \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                        \
        bn_input_grad_##SUFFIX(const T* __restrict__ dy, const View dv, const T* __restrict__ x, const View xv, \
                               T* __restrict__ out, const View ov,                                             \
                               const typename Traits<T>::Acc* __restrict__ coef, const int mode,               \
                               const int relu) {                                                               \
        elemt<T, INPUT_GRAD>(dy, dv, x, xv, out, ov, coef, mode, relu);                                        \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                        \
        bn_normalize_rows_##SUFFIX(const T* __restrict__ x, const View xv, T* __restrict__ out, const View ov, \
                                   const typename Traits<T>::Acc* __restrict__ coef, const int /* mode: 2 */,  \
                                   const int relu) {                                                           \
        elemt_rows<T, NORMALIZE>(nullptr, xv, x, xv, out, ov, coef, relu);                                     \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK) bn_normalize_add_rows_##SUFFIX(                        \
        const T* __restrict__ z, const View zv, const T* __restrict__ x, const View xv, T* __restrict__ out,    \
        const View ov, const typename Traits<T>::Acc* __restrict__ coef, const int /* mode: 2 */,               \
        const int relu) {                                                                                      \
        elemt_rows<T, NORMALIZE_ADD>(z, zv, x, xv, out, ov, coef, relu);                                       \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK) bn_input_grad_rows_##SUFFIX(                           \
        const T* __restrict__ dy, const View dv, const T* __restrict__ x, const View xv, T* __restrict__ out,   \
        const View ov, const typename Traits<T>::Acc* __restrict__ coef, const int /* mode: 2 */,               \
        const int relu) {                                                                                      \
        elemt_rows<T, INPUT_GRAD>(dy, dv, x, xv, out, ov, coef, relu);                                         \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                                        \
        bn_relu_grad_##SUFFIX(const T* __restrict__ dy, const View dv, const T* __restrict__ y, const View yv,  \
                              T* __restrict__ out, const View ov, const int mode) {                            \
        elemt<T, RELU_GRAD>(dy, dv, y, yv, out, ov, nullptr, mode, 0);                                         \
    }

ELEMT_KERNELS(float, f32)
ELEMT_KERNELS(double, f64)
ELEMT_KERNELS(__half, f16)
ELEMT_KERNELS(__nv_bfloat16, bf16)
