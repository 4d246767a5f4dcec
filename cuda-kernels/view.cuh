// Tensor views passed to the kernels by value (must match the #[repr(C)]
// structs in src/cuda/mod.rs).
#pragma once

namespace syncbn {

// A strided tensor seen as (outer, channels, inner): element (o, c, i) lives at
// base[offset + o * outer_stride + c * channel_stride + i * inner_stride].
// Several views passed to one kernel (x, dy, out) share the sizes and differ in
// strides and offset. The host canonicalizes them (src/cuda/mod.rs):
//  - channel-major path: elements of a channel are rows (o) of `inner` values;
//  - channel-innermost path: inner == 1, every "row" o holds one value of each
//    channel, the primary input has channel_stride == 1.
// Strides of dims of size 1 are 0.
struct View {
    long long outer;
    long long channels;
    long long inner;
    long long outer_stride;
    long long channel_stride;
    long long inner_stride;
    long long offset;
};

// A per-channel vector of a small tensor (weight, bias, running statistics,
// counter): element c at ptr[offset + c * stride], of run-time dtype `dtype`.
struct Vec1 {
    long long offset;
    long long stride;
    int dtype;
    int present;  // 0: no tensor (the pointer is null)
};

// A small 2-D tensor (rows, C) such as the (3, C) f64 sums and moments: element
// (r, c) at ptr[offset + r * row_stride + c * col_stride].
struct Mat2 {
    long long offset;
    long long row_stride;
    long long col_stride;
    int dtype;
    int present;  // 0: no tensor (the pointer is null)
};

__device__ __forceinline__ long long mat_index(const Mat2& m, int row, long long c) {
    return m.offset + row * m.row_stride + c * m.col_stride;
}

// A position (o, i) inside one channel's outer x inner plane, advanced by a
// fixed number of elements with carries instead of divisions.
struct PlanePos {
    long long o, i;
};

// The step `s` (elements) as (outer, inner) increments for a plane of width `inner`.
struct PlaneStep {
    long long dq, dr;
};

__device__ __forceinline__ PlaneStep plane_step(long long s, long long inner) {
    return PlaneStep{s / inner, s % inner};
}

__device__ __forceinline__ void plane_advance(PlanePos& p, const PlaneStep& s, long long inner) {
    p.i += s.dr;
    p.o += s.dq;
    if (p.i >= inner) {
        p.i -= inner;
        p.o += 1;
    }
}

// A position (o, c, i) in the whole (outer, channels, inner) tensor in row-major
// order, advanced by a fixed number of elements with carries.
struct TensorPos {
    long long o, c, i;
};

__device__ __forceinline__ TensorPos tensor_pos(long long p, long long channels, long long inner) {
    const long long q = p / inner;
    return TensorPos{q / channels, q % channels, p % inner};
}

__device__ __forceinline__ void tensor_advance(TensorPos& p, const TensorPos& s, long long channels, long long inner) {
    p.i += s.i;
    long long carry = 0;
    if (p.i >= inner) {
        p.i -= inner;
        carry = 1;
    }
    p.c += s.c + carry;
    carry = 0;
    if (p.c >= channels) {
        p.c -= channels;
        carry = 1;
    }
    p.o += s.o + carry;
}

__device__ __forceinline__ long long view_index(const View& v, long long o, long long c, long long i) {
    return v.offset + o * v.outer_stride + c * v.channel_stride + i * v.inner_stride;
}

}  // namespace syncbn
