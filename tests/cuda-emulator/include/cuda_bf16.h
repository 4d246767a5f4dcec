// Emulator stand-in for CUDA's <cuda_bf16.h>: bfloat16 with the conversions,
// operators and intrinsics that this crate's kernels and candle's kernels
// use, rounded to nearest even like the device; the arithmetic is in
// emu_half_ops.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_fp16.h"
#include "emu_half_ops.h"

struct __nv_bfloat16_raw {
    unsigned short x;
};

inline float syncbn_emu_bf16_to_float(unsigned short bits) {
    const std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline unsigned short syncbn_emu_bf16_bits(float v) {
    std::uint32_t u;
    std::memcpy(&u, &v, 4);
    if (std::isnan(v)) return static_cast<unsigned short>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}

// Direct rounding of an f64: first to f32 rounding to odd (keeps the sticky
// information, f32 has 16 more bits than bf16), then to nearest even.
inline unsigned short syncbn_emu_bf16_bits(double v) {
    float f = static_cast<float>(v);
    if (std::isfinite(f) && static_cast<double>(f) != v) {
        if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
        std::uint32_t u;
        std::memcpy(&u, &f, 4);
        u |= 1u;
        std::memcpy(&f, &u, 4);
    }
    return syncbn_emu_bf16_bits(f);
}

// Like CUDA's __nv_bfloat16 (see SYNCBN_EMU_HALF_MEMBERS), also built from
// __half.
struct __nv_bfloat16 {
    SYNCBN_EMU_HALF_MEMBERS(__nv_bfloat16, __nv_bfloat16_raw, syncbn_emu_bf16_bits, syncbn_emu_bf16_to_float)
    __nv_bfloat16(__half v) : __x(syncbn_emu_bf16_bits(__half2float(v))) {}
};

inline float __bfloat162float(__nv_bfloat16 b) { return syncbn_emu_bf16_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline __nv_bfloat16 __float2bfloat16(float v) { return __nv_bfloat16(v); }
inline __nv_bfloat16 __double2bfloat16(double v) { return __nv_bfloat16(v); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16(__nv_bfloat16_raw{b}); }

SYNCBN_EMU_HALF_OPS(__nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
SYNCBN_EMU_HALF2_OPS(__nv_bfloat16, __nv_bfloat162)

inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
