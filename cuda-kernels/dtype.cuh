// Element types of the SyncBatchNorm kernels: accumulator types, conversions,
// 128-bit vectorized loads/stores, and loads of small per-channel tensors whose
// dtype is only known at run time.
//
// Valid for sm_80 and later (no Hopper-only features).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace syncbn {

// Accumulator type and 128-bit vector width of each element type: f32, f16 and
// bf16 accumulate in f32, f64 in f64. `VEC` elements make 16 bytes.
template <typename T> struct Traits;

template <> struct Traits<float> {
    using Acc = float;
    static constexpr int VEC = 4;
    static __device__ __forceinline__ float to_acc(float v) { return v; }
    static __device__ __forceinline__ float from_acc(float v) { return v; }
    static __device__ __forceinline__ float from_f64(double v) { return static_cast<float>(v); }
};

template <> struct Traits<double> {
    using Acc = double;
    static constexpr int VEC = 2;
    static __device__ __forceinline__ double to_acc(double v) { return v; }
    static __device__ __forceinline__ double from_acc(double v) { return v; }
    static __device__ __forceinline__ double from_f64(double v) { return v; }
};

template <> struct Traits<__half> {
    using Acc = float;
    static constexpr int VEC = 8;
    static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
    static __device__ __forceinline__ __half from_f64(double v) { return __double2half(v); }
};

template <> struct Traits<__nv_bfloat16> {
    using Acc = float;
    static constexpr int VEC = 8;
    static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_f64(double v) { return __double2bfloat16(v); }
};

// `W` consecutive elements, aligned to their size (16 bytes when W == VEC), so
// that one load or store instruction moves them.
template <typename T, int W> struct alignas(sizeof(T) * W) Pack {
    T v[W];
};

// Loads `W` consecutive elements starting at `p` (aligned to W * sizeof(T)) as
// they are: the reductions keep their register tiles in the element type (two
// f16/bf16 values per register, half the registers of f32 values) and convert
// each value where they use it (acc_at).
template <typename T, int W> __device__ __forceinline__ Pack<T, W> load_pack(const T* __restrict__ p) {
    return *reinterpret_cast<const Pack<T, W>*>(p);
}

// Value `k` of a pack in the accumulator type.
template <typename T, int W>
__device__ __forceinline__ typename Traits<T>::Acc acc_at(const Pack<T, W>& p, int k) {
    return Traits<T>::to_acc(p.v[k]);
}

// Loads `W` consecutive elements starting at `p` (aligned to W * sizeof(T)) and
// converts them to the accumulator type.
template <typename T, int W>
__device__ __forceinline__ void load_acc(const T* __restrict__ p, typename Traits<T>::Acc (&out)[W]) {
    const Pack<T, W> pk = *reinterpret_cast<const Pack<T, W>*>(p);
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = Traits<T>::to_acc(pk.v[k]);
}

// Rounds `W` accumulator values to T and stores them at `p` (aligned to W * sizeof(T)).
template <typename T, int W>
__device__ __forceinline__ void store_acc(T* __restrict__ p, const typename Traits<T>::Acc (&in)[W]) {
    Pack<T, W> pk;
#pragma unroll
    for (int k = 0; k < W; ++k) pk.v[k] = Traits<T>::from_acc(in[k]);
    *reinterpret_cast<Pack<T, W>*>(p) = pk;
}

// Per-channel coefficients of the element-wise passes, COEF accumulator values
// per channel (see elementwise.cu): hi, lo (the mean split so that
// (x − hi) − lo keeps the precision of x − mean), b, k, a, and for the input
// gradient of a fused ReLU the forward's b and k again (mask scale, shift).
constexpr int COEF = 8;

// The normalization's affine step `centered·b + k` with the product rounded
// on its own, never contracted into an FMA: the forward and the backward's
// recomputation of a fused ReLU's mask then agree bit for bit, and both agree
// with the CPU path.
__device__ __forceinline__ float affine_rn(float centered, float b, float k) {
    return __fadd_rn(__fmul_rn(centered, b), k);
}
__device__ __forceinline__ double affine_rn(double centered, double b, double k) {
    return __dadd_rn(__dmul_rn(centered, b), k);
}

// Whether a fused ReLU passes the gradient where the normalization gave `v`
// before rounding: v rounded to T is > 0, or NaN (PyTorch's
// threshold_backward on the output).
template <typename T> __device__ __forceinline__ bool relu_passes(typename Traits<T>::Acc v) {
    return !(Traits<T>::to_acc(Traits<T>::from_acc(v)) <= typename Traits<T>::Acc(0));
}

// Run-time dtype codes of small tensors (must match `DtypeCode` in src/cuda/mod.rs).
enum DtypeCode : int { DT_F32 = 0, DT_F64 = 1, DT_F16 = 2, DT_BF16 = 3, DT_I64 = 4, DT_U32 = 5 };

// Element `idx` (storage index) of a small tensor of run-time dtype `dt`, as f64.
__device__ __forceinline__ double load_f64(const void* __restrict__ p, int dt, long long idx) {
    switch (dt) {
    case DT_F32: return static_cast<double>(static_cast<const float*>(p)[idx]);
    case DT_F64: return static_cast<const double*>(p)[idx];
    case DT_F16: return static_cast<double>(__half2float(static_cast<const __half*>(p)[idx]));
    case DT_BF16: return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[idx]));
    case DT_I64: return static_cast<double>(static_cast<const long long*>(p)[idx]);
    case DT_U32: return static_cast<double>(static_cast<const unsigned int*>(p)[idx]);
    default: return 0.0;
    }
}

// Stores `v` rounded to the run-time float dtype `dt` at storage index `idx`.
__device__ __forceinline__ void store_f64(void* __restrict__ p, int dt, long long idx, double v) {
    switch (dt) {
    case DT_F32: static_cast<float*>(p)[idx] = static_cast<float>(v); break;
    case DT_F64: static_cast<double*>(p)[idx] = v; break;
    case DT_F16: static_cast<__half*>(p)[idx] = __double2half(v); break;
    case DT_BF16: static_cast<__nv_bfloat16*>(p)[idx] = __double2bfloat16(v); break;
    default: break;
    }
}

}  // namespace syncbn
