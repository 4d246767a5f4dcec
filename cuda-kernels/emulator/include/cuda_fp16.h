// Emulator stand-in for CUDA's <cuda_fp16.h>: the 16-bit IEEE half type and
// the conversions the kernels use, correctly rounded (GCC's _Float16).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
    std::uint16_t bits;
};

inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.bits, 2);
    return static_cast<float>(f);
}

inline __half __float2half_rn(float v) {
    const _Float16 f = static_cast<_Float16>(v);
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}

inline __half __double2half(double v) {
    const _Float16 f = static_cast<_Float16>(v);
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}
