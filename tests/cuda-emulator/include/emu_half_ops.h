// Emulator helper for cuda_fp16.h and cuda_bf16.h: the arithmetic, comparison
// and math operations of a 16-bit float type, computed in f32 and rounded
// once to the type. For +, -, *, / and sqrt that is the correctly rounded
// result the device gives (f32 carries more than 2p + 2 bits of either
// type's p-bit significand, so rounding twice cannot differ from rounding
// once); the transcendental functions round the f32 library result, which
// the device only approximates.
#pragma once

#include <cmath>

// The members of a 16-bit float struct `T` like CUDA's: the bits in `__x`,
// trivially copyable, built from its raw struct `RAW` and the arithmetic types
// (`BITS(float or double)` rounds to the bits), converted to float (`TO_F`
// of the bits), to `RAW`, and explicitly to bool and the integer types.
#define SYNCBN_EMU_HALF_MEMBERS(T, RAW, BITS, TO_F)                                             \
    unsigned short __x;                                                                          \
    T() = default;                                                                               \
    T(RAW r) : __x(r.x) {}                                                                       \
    T(float v) : __x(BITS(v)) {}                                                                 \
    T(double v) : __x(BITS(v)) {}                                                                \
    T(short v) : __x(BITS(static_cast<float>(v))) {}                                             \
    T(unsigned short v) : __x(BITS(static_cast<float>(v))) {}                                   \
    T(int v) : __x(BITS(static_cast<double>(v))) {}                                              \
    T(unsigned v) : __x(BITS(static_cast<double>(v))) {}                                         \
    T(long v) : __x(BITS(static_cast<double>(v))) {}                                             \
    T(unsigned long v) : __x(BITS(static_cast<double>(v))) {}                                    \
    T(long long v) : __x(BITS(static_cast<double>(v))) {}                                        \
    T(unsigned long long v) : __x(BITS(static_cast<double>(v))) {}                               \
    operator float() const { return TO_F(__x); }                                                 \
    operator RAW() const { return RAW{__x}; }                                                    \
    explicit operator bool() const { return (__x & 0x7fffu) != 0; }                              \
    explicit operator signed char() const { return static_cast<signed char>(TO_F(__x)); }        \
    explicit operator unsigned char() const { return static_cast<unsigned char>(TO_F(__x)); }    \
    explicit operator short() const { return static_cast<short>(TO_F(__x)); }                    \
    explicit operator unsigned short() const { return static_cast<unsigned short>(TO_F(__x)); }  \
    explicit operator int() const { return static_cast<int>(TO_F(__x)); }                        \
    explicit operator unsigned() const { return static_cast<unsigned>(TO_F(__x)); }              \
    explicit operator long() const { return static_cast<long>(TO_F(__x)); }                      \
    explicit operator unsigned long() const { return static_cast<unsigned long>(TO_F(__x)); }    \
    explicit operator long long() const { return static_cast<long long>(TO_F(__x)); }            \
    explicit operator unsigned long long() const { return static_cast<unsigned long long>(TO_F(__x)); }

// Defines, for the 16-bit type `T` with `to_f(T) -> float` and
// `from_f(float) -> T` (round to nearest even), its operators and the
// intrinsics named with prefix `P` (`__h` for both CUDA types).
#define SYNCBN_EMU_HALF_OPS(T, to_f, from_f)                                                     \
    inline T operator+(T a, T b) { return from_f(to_f(a) + to_f(b)); }                           \
    inline T operator-(T a, T b) { return from_f(to_f(a) - to_f(b)); }                           \
    inline T operator*(T a, T b) { return from_f(to_f(a) * to_f(b)); }                           \
    inline T operator/(T a, T b) { return from_f(to_f(a) / to_f(b)); }                           \
    inline T operator-(T a) {                                                                    \
        T r = a;                                                                                 \
        r.__x ^= 0x8000u;                                                                        \
        return r;                                                                                \
    }                                                                                            \
    inline T operator+(T a) { return a; }                                                        \
    inline T& operator+=(T& a, T b) { return a = a + b; }                                        \
    inline T& operator-=(T& a, T b) { return a = a - b; }                                        \
    inline T& operator*=(T& a, T b) { return a = a * b; }                                        \
    inline T& operator/=(T& a, T b) { return a = a / b; }                                        \
    inline bool operator==(T a, T b) { return to_f(a) == to_f(b); }                              \
    inline bool operator!=(T a, T b) { return to_f(a) != to_f(b); }                              \
    inline bool operator<(T a, T b) { return to_f(a) < to_f(b); }                                \
    inline bool operator>(T a, T b) { return to_f(a) > to_f(b); }                                \
    inline bool operator<=(T a, T b) { return to_f(a) <= to_f(b); }                              \
    inline bool operator>=(T a, T b) { return to_f(a) >= to_f(b); }                              \
    inline T __hadd(T a, T b) { return a + b; }                                                  \
    inline T __hsub(T a, T b) { return a - b; }                                                  \
    inline T __hmul(T a, T b) { return a * b; }                                                  \
    inline T __hdiv(T a, T b) { return a / b; }                                                  \
    inline T __hneg(T a) { return -a; }                                                          \
    inline T __habs(T a) {                                                                       \
        T r = a;                                                                                 \
        r.__x &= 0x7fffu;                                                                        \
        return r;                                                                                \
    }                                                                                            \
    inline bool __hisnan(T a) { return std::isnan(to_f(a)); }                                    \
    inline bool __hisinf(T a) { return std::isinf(to_f(a)); }                                    \
    inline bool __heq(T a, T b) { return a == b; }                                               \
    inline bool __hne(T a, T b) { return a != b; }                                               \
    inline bool __hlt(T a, T b) { return a < b; }                                                \
    inline bool __hgt(T a, T b) { return a > b; }                                                \
    inline bool __hle(T a, T b) { return a <= b; }                                               \
    inline bool __hge(T a, T b) { return a >= b; }                                               \
    /* max/min: a NaN operand loses (like fmaxf); the _nan forms propagate it. */                \
    inline T __hmax(T a, T b) { return from_f(std::fmax(to_f(a), to_f(b))); }                    \
    inline T __hmin(T a, T b) { return from_f(std::fmin(to_f(a), to_f(b))); }                    \
    inline T __hmax_nan(T a, T b) { return __hisnan(a) ? a : (__hisnan(b) ? b : __hmax(a, b)); } \
    inline T __hmin_nan(T a, T b) { return __hisnan(a) ? a : (__hisnan(b) ? b : __hmin(a, b)); } \
    inline T __hfma(T a, T b, T c) {                                                             \
        return from_f(static_cast<float>(static_cast<double>(to_f(a)) * to_f(b) + to_f(c)));     \
    }                                                                                            \
    inline T hsqrt(T a) { return from_f(std::sqrt(to_f(a))); }                                   \
    inline T hrsqrt(T a) { return from_f(1.0f / std::sqrt(to_f(a))); }                           \
    inline T hrcp(T a) { return from_f(1.0f / to_f(a)); }                                        \
    inline T hexp(T a) { return from_f(std::exp(to_f(a))); }                                     \
    inline T hlog(T a) { return from_f(std::log(to_f(a))); }                                     \
    inline T hsin(T a) { return from_f(std::sin(to_f(a))); }                                     \
    inline T hcos(T a) { return from_f(std::cos(to_f(a))); }                                     \
    inline T htanh(T a) { return from_f(std::tanh(to_f(a))); }                                   \
    inline T hfloor(T a) { return from_f(std::floor(to_f(a))); }                                 \
    inline T hceil(T a) { return from_f(std::ceil(to_f(a))); }                                   \
    inline T htrunc(T a) { return from_f(std::trunc(to_f(a))); }                                 \
    inline T hrint(T a) { return from_f(std::nearbyint(to_f(a))); }

// Defines the paired type `T2` of `T` and its lane-wise intrinsics.
#define SYNCBN_EMU_HALF2_OPS(T, T2)                                                          \
    struct T2 {                                                                              \
        T x, y;                                                                              \
    };                                                                                       \
    inline T2 __hadd2(T2 a, T2 b) { return T2{a.x + b.x, a.y + b.y}; }                       \
    inline T2 __hsub2(T2 a, T2 b) { return T2{a.x - b.x, a.y - b.y}; }                       \
    inline T2 __hmul2(T2 a, T2 b) { return T2{a.x * b.x, a.y * b.y}; }                       \
    inline T2 __h2div(T2 a, T2 b) { return T2{a.x / b.x, a.y / b.y}; }                       \
    inline T2 __hmax2(T2 a, T2 b) { return T2{__hmax(a.x, b.x), __hmax(a.y, b.y)}; }         \
    inline T2 __hmin2(T2 a, T2 b) { return T2{__hmin(a.x, b.x), __hmin(a.y, b.y)}; }         \
    inline T2 __hmax2_nan(T2 a, T2 b) { return T2{__hmax_nan(a.x, b.x), __hmax_nan(a.y, b.y)}; } \
    inline T2 __hmin2_nan(T2 a, T2 b) { return T2{__hmin_nan(a.x, b.x), __hmin_nan(a.y, b.y)}; } \
    inline T2 operator+(T2 a, T2 b) { return __hadd2(a, b); }                                \
    inline T2 operator-(T2 a, T2 b) { return __hsub2(a, b); }                                \
    inline T2 operator*(T2 a, T2 b) { return __hmul2(a, b); }                                \
    inline T2 operator/(T2 a, T2 b) { return __h2div(a, b); }
