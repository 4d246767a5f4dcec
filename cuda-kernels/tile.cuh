// Per-thread accumulation helpers shared by the reduction kernels.
#pragma once

#include "reduce.cuh"

namespace syncbn {

// Rows or vectors a thread loads before it reduces them: UNROLL independent
// 128-bit loads in flight per thread.
constexpr int UNROLL = 4;
// Threads per block of every kernel (a multiple of 32).
constexpr int BLOCK = 256;

// Corrected two-pass moments of a register tile (the values vals[u][k] with
// u < cnt, k == lane), merged into `acc`. `cnt` may be 0 (no-op).
template <typename A, int W>
__device__ __forceinline__ void tile_moments(Welford<A>& acc, const A (&vals)[UNROLL][W], int cnt, int k) {
    if (cnt == 0) return;
    A sum = A(0);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
        if (u < cnt) sum += vals[u][k];
    const A n = A(cnt);
    // UNROLL is a power of two, so for a full tile the reciprocal is exact.
    const A inv = cnt == UNROLL ? A(1) / A(UNROLL) : A(1) / n;
    const A shift = sum * inv;
    A d = A(0), q = A(0);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (u < cnt) {
            const A e = vals[u][k] - shift;
            d += e;
            q += e * e;
        }
    }
    A m2 = q - d * d * inv;
    if (m2 < A(0)) m2 = A(0);
    welford_add(acc, n, shift + d * inv, m2);
}

// Same for a tile whose every loaded vector holds W values of the same channel:
// all cnt * W values form one set.
template <typename A, int W>
__device__ __forceinline__ void tile_moments_all(Welford<A>& acc, const A (&vals)[UNROLL][W], int cnt) {
    if (cnt == 0) return;
    A sum = A(0);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
        if (u < cnt) {
#pragma unroll
            for (int k = 0; k < W; ++k) sum += vals[u][k];
        }
    const A n = A(cnt * W);
    // UNROLL * W is a power of two, so for a full tile the reciprocal is exact.
    const A inv = cnt == UNROLL ? A(1) / A(UNROLL * W) : A(1) / n;
    const A shift = sum * inv;
    A d = A(0), q = A(0);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (u < cnt) {
#pragma unroll
            for (int k = 0; k < W; ++k) {
                const A e = vals[u][k] - shift;
                d += e;
                q += e * e;
            }
        }
    }
    A m2 = q - d * d * inv;
    if (m2 < A(0)) m2 = A(0);
    welford_add(acc, n, shift + d * inv, m2);
}

}  // namespace syncbn
