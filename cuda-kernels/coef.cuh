// The per-channel coefficients of the element-wise passes (COEF accumulator
// values per channel, see dtype.cuh), written in f64 with the CPU path's
// operations (explicit _rn intrinsics: no contraction) and rounded to the
// accumulator type A once. Shared by the coefficient kernels (elementwise.cu)
// and the moments kernels (stats.cu), which write the forward's coefficients
// in the launch that computes the moments.
#pragma once
#include "dtype.cuh"
#include "view.cuh"

namespace syncbn {

// One channel's COEF values: hi, lo, b, k, a, then the forward's b and k of
// a fused ReLU's mask (mb, mk; 0 without), (pad).
template <typename A>
__device__ __forceinline__ void write_coef(A* __restrict__ coef, long long c, double mean, double b, double k,
                                           double a, double mb = 0.0, double mk = 0.0) {
    const A hi = static_cast<A>(mean);
    A* p = coef + c * COEF;
    p[0] = hi;
    p[1] = static_cast<A>(mean - static_cast<double>(hi));
    p[2] = static_cast<A>(b);
    p[3] = static_cast<A>(k);
    p[4] = static_cast<A>(a);
    p[5] = static_cast<A>(mb);
    p[6] = static_cast<A>(mk);
    p[7] = A(0);
}

// The forward's coefficients of channel c from its mean and invstd:
// b = invstd * weight, k = bias, a = 0 (weight 1 and bias 0 when absent).
template <typename A>
__device__ __forceinline__ void write_forward_coef(A* __restrict__ coef, long long c, double mean, double invstd,
                                                   const void* __restrict__ w, const Vec1& wv,
                                                   const void* __restrict__ bias, const Vec1& bv) {
    const double weight = wv.present ? load_f64(w, wv.dtype, wv.offset + c * wv.stride) : 1.0;
    const double shift = bv.present ? load_f64(bias, bv.dtype, bv.offset + c * bv.stride) : 0.0;
    write_coef<A>(coef, c, mean, __dmul_rn(invstd, weight), shift, 0.0);
}

// write_forward_coef into a buffer of run-time accumulator dtype `coef_dt`
// (DT_F32 or DT_F64); nothing when `coef` is null.
__device__ __forceinline__ void write_forward_coef_dyn(void* __restrict__ coef, int coef_dt, long long c,
                                                       double mean, double invstd, const void* __restrict__ w,
                                                       const Vec1& wv, const void* __restrict__ bias,
                                                       const Vec1& bv) {
    if (coef == nullptr) return;
    if (coef_dt == DT_F64)
        write_forward_coef<double>(static_cast<double*>(coef), c, mean, invstd, w, wv, bias, bv);
    else
        write_forward_coef<float>(static_cast<float*>(coef), c, mean, invstd, w, wv, bias, bv);
}

}  // namespace syncbn
