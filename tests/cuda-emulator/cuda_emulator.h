// Host emulation of the CUDA features the SyncBatchNorm kernels use, so that
// the kernels of cuda-kernels/*.cu run, unchanged, on a CPU in the unit tests
// (src/cuda/emulator.rs compiles them with g++ and `-include` of this file).
//
// Every CUDA thread of a block is a cooperative fiber on the calling OS
// thread; blocks run one after the other. `__syncthreads` waits for every
// thread of the block, a warp shuffle for the 32 lanes of its warp; a thread
// that exits while others wait at a barrier, or lanes that never meet, are
// reported as a deadlock instead of hanging. `__shared__` variables are
// `static thread_local`: one copy per OS thread, shared by the fibers of the
// running block (a block does not rely on their initial contents).
//
// Not a simulator of timing, memory model or occupancy: it checks indexing,
// work splits, barriers and numerics. See runtime.cpp for the scheduler.
#pragma once

// The scheduler (runtime.cpp) switches to a fiber with _longjmp, a jump onto
// another stack, which glibc's fortified longjmp refuses. This header comes
// first in every emulated file (`-include`), before any system header reads
// the macro.
#undef _FORTIFY_SOURCE

#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

struct uint3 {
    unsigned x, y, z;
};
using dim3 = uint3;

// The vector types kernels load and store (same sizes and alignments as CUDA's).
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

namespace cuda_emulator {

// Index and sizes of the running thread and its block and grid.
const uint3& thread_idx();
const uint3& block_idx();
const uint3& block_dim();
const uint3& grid_dim();

// Waits until every thread of the block has arrived.
void sync_block();

// How a warp shuffle picks the lane it reads (CUDA's four shuffles).
enum class Shuffle { Down, Up, Xor, Index };

// The calling lane publishes `bytes` bytes at `in`, waits for the other lanes
// of the warp (all 32 must take part: `mask` must be full), then copies the
// bytes of the lane that `mode` and `arg` select to `out`. As on the device,
// lanes form groups of `width` (a power of two up to 32); a lane whose source
// lies past its group (before it, for Up) reads its own value, while Xor may
// read from earlier groups.
void shuffle(unsigned mask, const void* in, void* out, std::size_t bytes, Shuffle mode, unsigned arg, unsigned width);

}  // namespace cuda_emulator

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define threadIdx (::cuda_emulator::thread_idx())
#define blockIdx (::cuda_emulator::block_idx())
#define blockDim (::cuda_emulator::block_dim())
#define gridDim (::cuda_emulator::grid_dim())

inline void __syncthreads() { ::cuda_emulator::sync_block(); }

#define warpSize 32

#define SYNCBN_EMU_SHUFFLE(name, mode)                                                           \
    template <typename T> inline T name(unsigned mask, T v, unsigned arg, int width = warpSize) { \
        static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");                          \
        T out;                                                                                    \
        ::cuda_emulator::shuffle(mask, &v, &out, sizeof(T), mode, arg, static_cast<unsigned>(width)); \
        return out;                                                                               \
    }
SYNCBN_EMU_SHUFFLE(__shfl_down_sync, ::cuda_emulator::Shuffle::Down)
SYNCBN_EMU_SHUFFLE(__shfl_up_sync, ::cuda_emulator::Shuffle::Up)
SYNCBN_EMU_SHUFFLE(__shfl_xor_sync, ::cuda_emulator::Shuffle::Xor)
SYNCBN_EMU_SHUFFLE(__shfl_sync, ::cuda_emulator::Shuffle::Index)
#undef SYNCBN_EMU_SHUFFLE

template <typename T> inline T __ldg(const T* p) { return *p; }

// Atomics. Fibers only switch at barriers, so within a launch a
// read-modify-write is already indivisible; the builtins also keep launches
// that run at the same time on other OS threads (several ranks in one
// process) correct. Floating-point atomics are compare-and-swap loops on the
// bits.
// The value parameters do not take part in deduction: the pointer picks the
// overload, as with CUDA's fixed-type overloads.
template <typename T> struct syncbn_emu_value {
    using type = T;
};
template <typename T> using syncbn_emu_value_t = typename syncbn_emu_value<T>::type;

template <typename T> inline T atomicCAS(T* p, syncbn_emu_value_t<T> expected, syncbn_emu_value_t<T> desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;  // the old value, whether or not it was replaced
}
template <typename T, typename F> inline T syncbn_emu_atomic_update(T* p, F f) {
    using Bits = std::conditional_t<sizeof(T) == 2, unsigned short,
                                    std::conditional_t<sizeof(T) == 4, unsigned, unsigned long long>>;
    static_assert(sizeof(T) == sizeof(Bits), "atomics on 2, 4 or 8 bytes");
    Bits* bits = reinterpret_cast<Bits*>(p);
    Bits old = __atomic_load_n(bits, __ATOMIC_SEQ_CST);
    for (;;) {
        T old_value, new_value;
        std::memcpy(&old_value, &old, sizeof(T));
        new_value = f(old_value);
        Bits desired;
        std::memcpy(&desired, &new_value, sizeof(T));
        if (__atomic_compare_exchange_n(bits, &old, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return old_value;
    }
}
template <typename T> inline T atomicAdd(T* p, syncbn_emu_value_t<T> v) {
    return syncbn_emu_atomic_update(p, [v](T old) { return static_cast<T>(old + v); });
}
template <typename T> inline T atomicMax(T* p, syncbn_emu_value_t<T> v) {
    return syncbn_emu_atomic_update(p, [v](T old) { return old < v ? v : old; });
}
template <typename T> inline T atomicMin(T* p, syncbn_emu_value_t<T> v) {
    return syncbn_emu_atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <typename T> inline T atomicExch(T* p, syncbn_emu_value_t<T> v) {
    return syncbn_emu_atomic_update(p, [v](T) { return v; });
}

// Reinterpretations of the bits.
template <typename To, typename From> inline To syncbn_emu_bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "same size");
    To r;
    std::memcpy(&r, &v, sizeof(To));
    return r;
}
inline float __int_as_float(int v) { return syncbn_emu_bit_cast<float>(v); }
inline float __uint_as_float(unsigned v) { return syncbn_emu_bit_cast<float>(v); }
inline int __float_as_int(float v) { return syncbn_emu_bit_cast<int>(v); }
inline unsigned __float_as_uint(float v) { return syncbn_emu_bit_cast<unsigned>(v); }
inline double __longlong_as_double(long long v) { return syncbn_emu_bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return syncbn_emu_bit_cast<long long>(v); }

// Device math functions that the C++ library lacks.
inline float normcdff(float v) { return 0.5f * std::erfc(-v / std::sqrt(2.0f)); }
inline double normcdf(double v) { return 0.5 * std::erfc(-v / std::sqrt(2.0)); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __fdividef(float a, float b) { return a / b; }

// Correctly rounded f32 and f64 arithmetic, as on the device (the emulator is built
// with -ffp-contract=off, so nothing is fused).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }

// The device's integer and float min/max overloads.
#define SYNCBN_EMU_MINMAX(T)                                  \
    inline T min(T a, T b) { return b < a ? b : a; }          \
    inline T max(T a, T b) { return a < b ? b : a; }
SYNCBN_EMU_MINMAX(int)
SYNCBN_EMU_MINMAX(unsigned)
SYNCBN_EMU_MINMAX(long)
SYNCBN_EMU_MINMAX(unsigned long)
SYNCBN_EMU_MINMAX(long long)
SYNCBN_EMU_MINMAX(unsigned long long)
#undef SYNCBN_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
using std::fmax;
using std::fmin;
// The device's classification functions are global.
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
