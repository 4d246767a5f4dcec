// Emulator stand-in for CUDA's <cuda_bf16.h>: bfloat16 and the conversions
// the kernels use, rounded to nearest even like the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    std::uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    std::uint32_t u;
    std::memcpy(&u, &v, 4);
    __nv_bfloat16 b;
    if (std::isnan(v)) {
        b.bits = static_cast<std::uint16_t>((u >> 16) | 0x40u);
        return b;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = static_cast<std::uint16_t>(u >> 16);
    return b;
}

// Direct rounding of an f64: first to f32 rounding to odd (keeps the sticky
// information, f32 has 16 more bits than bf16), then to nearest even.
inline __nv_bfloat16 __double2bfloat16(double v) {
    float f = static_cast<float>(v);
    if (std::isfinite(f) && static_cast<double>(f) != v) {
        if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
        std::uint32_t u;
        std::memcpy(&u, &f, 4);
        u |= 1u;
        std::memcpy(&f, &u, 4);
    }
    return __float2bfloat16_rn(f);
}
