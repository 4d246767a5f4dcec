// Emulator stand-in for CUDA's <cuda_fp8.h>: the E4M3 and E5M2 8-bit float
// types and the conversions candle's kernels use. Conversions to fp8 round
// to nearest even and saturate to the largest finite value (__NV_SATFINITE,
// the types' default); NaN stays NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

typedef unsigned char __nv_fp8_storage_t;
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };

// Decodes fp8 bits with `man` significand bits and exponent bias `bias`.
inline float syncbn_emu_fp8_to_float(__nv_fp8_storage_t b, __nv_fp8_interpretation_t kind) {
    const int man = kind == __NV_E4M3 ? 3 : 2;
    const int bias = kind == __NV_E4M3 ? 7 : 15;
    const int exp_bits = 7 - man;
    const float sign = (b & 0x80u) ? -1.0f : 1.0f;
    const int e = (b >> man) & ((1 << exp_bits) - 1);
    const int m = b & ((1 << man) - 1);
    if (kind == __NV_E4M3 && e == 15 && m == 7) return NAN;
    if (kind == __NV_E5M2 && e == 31) return m == 0 ? sign * INFINITY : NAN;
    if (e == 0) return sign * std::ldexp(static_cast<float>(m), 1 - bias - man);
    return sign * std::ldexp(static_cast<float>((1 << man) | m), e - bias - man);
}

inline __nv_fp8_storage_t syncbn_emu_fp8_from_double(double v, __nv_saturation_t sat,
                                                      __nv_fp8_interpretation_t kind) {
    const int man = kind == __NV_E4M3 ? 3 : 2;
    const int bias = kind == __NV_E4M3 ? 7 : 15;
    const unsigned char max_bits = kind == __NV_E4M3 ? 0x7e : 0x7b;  // 448, 57344
    const unsigned char inf_or_nan = kind == __NV_E4M3 ? 0x7f : 0x7c;
    if (std::isnan(v)) return 0x7f;
    const unsigned char sign = std::signbit(v) ? 0x80 : 0x00;
    const double a = std::fabs(v);
    const double max_finite = syncbn_emu_fp8_to_float(max_bits, kind);
    // Halfway between the largest finite value and the next (absent) step.
    const double limit = max_finite + std::ldexp(1.0, std::ilogb(max_finite) - man - 1);
    if (a >= limit || std::isinf(a))
        return sign | (sat == __NV_SATFINITE ? max_bits : inf_or_nan);
    const int min_exp = 1 - bias;  // exponent of the smallest normal
    int e = std::ilogb(a);
    if (a == 0.0 || e < min_exp) e = min_exp;
    // Multiples of the spacing at exponent e, rounded to nearest even.
    const double q = std::nearbyint(std::ldexp(a, man - e));
    if (q == 0.0) return sign;
    long bits;
    if (q >= (2 << man)) {  // rounded up into the next binade
        bits = static_cast<long>(e + 1 + bias) << man;
    } else if (q < (1 << man)) {  // subnormal
        bits = static_cast<long>(q);
    } else {
        bits = (static_cast<long>(e + bias) << man) | (static_cast<long>(q) - (1 << man));
    }
    if (bits > max_bits) bits = sat == __NV_SATFINITE ? max_bits : inf_or_nan;
    return sign | static_cast<unsigned char>(bits);
}

inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t b, __nv_fp8_interpretation_t kind) {
    return static_cast<__half_raw>(__half(syncbn_emu_fp8_to_float(b, kind)));
}
inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float v, __nv_saturation_t sat, __nv_fp8_interpretation_t kind) {
    return syncbn_emu_fp8_from_double(v, sat, kind);
}
inline __nv_fp8_storage_t __nv_cvt_double_to_fp8(double v, __nv_saturation_t sat,
                                                 __nv_fp8_interpretation_t kind) {
    return syncbn_emu_fp8_from_double(v, sat, kind);
}

// The fp8 types of CUDA: built from the arithmetic and 16-bit float types
// (saturating), converted to float, the bits in `__x`.
#define SYNCBN_EMU_FP8_TYPE(NAME, KIND)                                                            \
    struct NAME {                                                                                  \
        __nv_fp8_storage_t __x;                                                                    \
        NAME() = default;                                                                          \
        explicit NAME(float v) : __x(syncbn_emu_fp8_from_double(v, __NV_SATFINITE, KIND)) {}      \
        explicit NAME(double v) : __x(syncbn_emu_fp8_from_double(v, __NV_SATFINITE, KIND)) {}     \
        explicit NAME(__half v) : NAME(__half2float(v)) {}                                        \
        explicit NAME(__nv_bfloat16 v) : NAME(__bfloat162float(v)) {}                             \
        explicit NAME(int v) : NAME(static_cast<double>(v)) {}                                    \
        explicit NAME(unsigned v) : NAME(static_cast<double>(v)) {}                               \
        explicit NAME(long v) : NAME(static_cast<double>(v)) {}                                   \
        explicit NAME(unsigned long v) : NAME(static_cast<double>(v)) {}                          \
        explicit NAME(long long v) : NAME(static_cast<double>(v)) {}                              \
        explicit NAME(unsigned long long v) : NAME(static_cast<double>(v)) {}                     \
        explicit NAME(short v) : NAME(static_cast<double>(v)) {}                                  \
        explicit NAME(unsigned short v) : NAME(static_cast<double>(v)) {}                         \
        explicit operator float() const { return syncbn_emu_fp8_to_float(__x, KIND); }            \
        explicit operator double() const { return syncbn_emu_fp8_to_float(__x, KIND); }           \
        explicit operator __half() const { return __half(syncbn_emu_fp8_to_float(__x, KIND)); }   \
        explicit operator __nv_bfloat16() const {                                                 \
            return __nv_bfloat16(syncbn_emu_fp8_to_float(__x, KIND));                             \
        }                                                                                          \
        explicit operator int() const { return static_cast<int>(syncbn_emu_fp8_to_float(__x, KIND)); } \
        explicit operator unsigned char() const {                                                 \
            return static_cast<unsigned char>(syncbn_emu_fp8_to_float(__x, KIND));                \
        }                                                                                          \
        explicit operator bool() const { return (__x & 0x7fu) != 0; }                             \
    };
SYNCBN_EMU_FP8_TYPE(__nv_fp8_e4m3, __NV_E4M3)
SYNCBN_EMU_FP8_TYPE(__nv_fp8_e5m2, __NV_E5M2)
#undef SYNCBN_EMU_FP8_TYPE
