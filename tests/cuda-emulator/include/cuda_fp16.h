// Emulator stand-in for CUDA's <cuda_fp16.h>: the 16-bit IEEE half type with
// the conversions, operators and intrinsics that this crate's kernels and
// candle's kernels use. Conversions round correctly (GCC's _Float16); the
// arithmetic is in emu_half_ops.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "emu_half_ops.h"

struct __half_raw {
    unsigned short x;
};

inline float syncbn_emu_half_to_float(unsigned short bits) {
    _Float16 f;
    std::memcpy(&f, &bits, 2);
    return static_cast<float>(f);
}

template <typename F> inline unsigned short syncbn_emu_half_bits(F v) {
    const _Float16 f = static_cast<_Float16>(v);  // one correct rounding from F
    unsigned short bits;
    std::memcpy(&bits, &f, 2);
    return bits;
}

// Like CUDA's __half (see SYNCBN_EMU_HALF_MEMBERS).
struct __half {
    SYNCBN_EMU_HALF_MEMBERS(__half, __half_raw, syncbn_emu_half_bits, syncbn_emu_half_to_float)
};

inline float __half2float(__half h) { return syncbn_emu_half_to_float(h.__x); }
inline __half __float2half_rn(float v) { return __half(v); }
inline __half __float2half(float v) { return __half(v); }
inline __half __double2half(double v) { return __half(v); }
inline __half __int2half_rn(int v) { return __half(v); }
inline __half __uint2half_rn(unsigned v) { return __half(v); }
inline int __half2int_rz(__half h) { return static_cast<int>(__half2float(h)); }
inline unsigned __half2uint_rz(__half h) { return static_cast<unsigned>(__half2float(h)); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short b) { return __half(__half_raw{b}); }

SYNCBN_EMU_HALF_OPS(__half, __half2float, __float2half_rn)
SYNCBN_EMU_HALF2_OPS(__half, __half2)
