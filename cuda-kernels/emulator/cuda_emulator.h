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

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

struct uint3 {
    unsigned x, y, z;
};
using dim3 = uint3;

namespace cuda_emulator {

// Index and sizes of the running thread and its block and grid.
const uint3& thread_idx();
const uint3& block_idx();
const uint3& block_dim();
const uint3& grid_dim();

// Waits until every thread of the block has arrived.
void sync_block();

// Lane `lane` of the calling thread's warp publishes `bytes` bytes at `in`,
// waits for the other lanes of the warp (all 32 must take part: `mask` must
// be full), then copies lane `src`'s bytes to `out`, where `src` is
// `lane + delta` or the lane itself past the end of the warp.
void shuffle_down(unsigned mask, const void* in, void* out, std::size_t bytes, unsigned delta);

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

template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    T out;
    ::cuda_emulator::shuffle_down(mask, &v, &out, sizeof(T), delta);
    return out;
}

// Correctly rounded f64 arithmetic, as on the device (the emulator is built
// with -ffp-contract=off, so nothing is fused).
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
SYNCBN_EMU_MINMAX(long long)
SYNCBN_EMU_MINMAX(unsigned long long)
#undef SYNCBN_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
using std::fmax;
using std::fmin;
