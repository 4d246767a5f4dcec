// Per-thread accumulation helpers shared by the reduction kernels.
#pragma once

#include "dtype.cuh"
#include "reduce.cuh"

namespace syncbn {

// Rows or vectors a thread loads before it reduces them: UNROLL independent
// 128-bit loads in flight per thread.
constexpr int UNROLL = 4;

// Tile depth of a reduction that loads W elements at a time: as many loads as
// UNROLL 128-bit vectors hold bytes (UNROLL with W = VEC; UNROLL * VEC
// scalars with W = 1, when rows or strides rule out vectors: 7x7 maps, odd
// map sizes such as 65x65; 2 * UNROLL 8-byte half vectors of f16/bf16 with
// W = VEC / 2, rows of 14x14 maps), so that every path keeps as many bytes in
// flight per thread, in as many registers.
template <typename T, int W> struct TileDepth {
    static_assert(W >= 1 && Traits<T>::VEC % W == 0, "W divides the vector width");
    static constexpr int value = UNROLL * (Traits<T>::VEC / W);
};
// Threads per block of every kernel (a multiple of 32).
constexpr int BLOCK = 256;

// Corrected two-pass moments of a register tile of U loads (the values
// vals[u].v[k] with u < cnt, k == lane), merged into `acc`. `cnt` may be 0 (no-op).
template <typename T, int U, int W>
__device__ __forceinline__ void tile_moments(Welford<typename Traits<T>::Acc>& acc, const Pack<T, W> (&vals)[U],
                                             int cnt, int k) {
    using A = typename Traits<T>::Acc;
    if (cnt == 0) return;
    A sum = A(0);
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (u < cnt) sum += acc_at(vals[u], k);
    const A n = A(cnt);
    // U is a power of two, so for a full tile the reciprocal is exact.
    const A inv = cnt == U ? A(1) / A(U) : A(1) / n;
    const A shift = sum * inv;
    A d = A(0), q = A(0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (u < cnt) {
            const A e = acc_at(vals[u], k) - shift;
            d += e;
            q += e * e;
        }
    }
    A m2 = q - d * d * inv;
    if (m2 < A(0)) m2 = A(0);
    welford_add(acc, n, shift + d * inv, m2);
}

// Same for a tile of U loads whose every loaded vector holds W values of the
// same channel: all cnt * W values form one set.
template <typename T, int U, int W>
__device__ __forceinline__ void tile_moments_all(Welford<typename Traits<T>::Acc>& acc,
                                                 const Pack<T, W> (&vals)[U], int cnt) {
    using A = typename Traits<T>::Acc;
    if (cnt == 0) return;
    A sum = A(0);
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (u < cnt) {
#pragma unroll
            for (int k = 0; k < W; ++k) sum += acc_at(vals[u], k);
        }
    const A n = A(cnt * W);
    // U * W is a power of two, so for a full tile the reciprocal is exact.
    const A inv = cnt == U ? A(1) / A(U * W) : A(1) / n;
    const A shift = sum * inv;
    A d = A(0), q = A(0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (u < cnt) {
#pragma unroll
            for (int k = 0; k < W; ++k) {
                const A e = acc_at(vals[u], k) - shift;
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
