//! Element types the ops accept and the accumulator type each one computes in.

use candle::WithDType;
use half::{bf16, f16};
use std::ops::{Add, AddAssign, Mul, Sub};

/// The floating-point type a kernel accumulates in: `f32` for f32/f16/bf16
/// inputs, `f64` for f64 inputs.
pub trait Accum:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + AddAssign
    + 'static
{
    /// Additive identity.
    const ZERO: Self;
    /// Rounds an f64 to this type.
    fn from_f64(v: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
}

impl Accum for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Accum for f64 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

/// An input element type (f32, f64, f16, bf16) with its accumulator.
pub trait Element: WithDType + Copy + Send + Sync {
    /// The accumulator type.
    type Acc: Accum;
    /// Converts to the accumulator type (exact).
    fn to_acc(self) -> Self::Acc;
    /// Rounds an accumulator value to the element type.
    fn from_acc(v: Self::Acc) -> Self;
    /// The largest accumulator value that rounds to a value `<= 0` of this
    /// type: 0 for f32 and f64, half the smallest subnormal for f16 (2⁻²⁵)
    /// and bf16 (2⁻¹³⁴), which round to +0 (ties to even). So
    /// `Self::from_acc(v).to_acc() <= 0` exactly when `v <= RELU_BOUND`,
    /// and the fused ReLU's gradient mask needs no rounding.
    const RELU_BOUND: Self::Acc;
    /// Whether the kernels convert this type in runs of [`CONVERT_LANES`]
    /// values ([`Element::to_acc_lanes`], [`Element::from_acc_lanes`])
    /// rather than one by one in loops the compiler vectorizes: true for f16,
    /// whose conversions are single instructions on x86-64 (F16C) but calls
    /// when written per element.
    const CONVERTS_IN_LANES: bool = false;
    /// [`Element::to_acc`] of [`CONVERT_LANES`] values at once, bit for bit,
    /// with the CPU's instructions for it where `cpu` says it has them.
    #[inline(always)]
    fn to_acc_lanes(xs: [Self; CONVERT_LANES], cpu: LaneCpu) -> [Self::Acc; CONVERT_LANES] {
        let _ = cpu;
        xs.map(Self::to_acc)
    }
    /// [`Element::from_acc`] of [`CONVERT_LANES`] values at once, bit for
    /// bit, with the CPU's instructions for it where `cpu` says it has them.
    #[inline(always)]
    fn from_acc_lanes(vs: [Self::Acc; CONVERT_LANES], cpu: LaneCpu) -> [Self; CONVERT_LANES] {
        let _ = cpu;
        vs.map(Self::from_acc)
    }
    /// Whether the value is `<= 0` (false for NaN), as
    /// `self.to_acc() <= 0` without converting.
    #[inline(always)]
    fn not_positive(self) -> bool {
        self.to_acc() <= <Self::Acc as Accum>::ZERO
    }
}

/// Values that [`Element::to_acc_lanes`] and [`Element::from_acc_lanes`]
/// convert at once: one AVX2 vector of f32.
pub const CONVERT_LANES: usize = 8;

/// Which conversion instructions the CPU has, detected once by
/// [`LaneCpu::detect`] and carried into the loops that convert in lanes:
/// a check per run of [`CONVERT_LANES`] values (an atomic load, which the
/// compiler keeps inside the loop, and two branches) took about a third of
/// the instructions of the f16 element-wise loops and kept them from being
/// unrolled.
#[derive(Debug, Clone, Copy)]
pub struct LaneCpu {
    /// The CPU has F16C (checked at run time by [`LaneCpu::detect`], the
    /// only constructor: the conversions rely on it).
    // Read by the x86-64 conversions only: other CPUs have no F16C path.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    f16c: bool,
}

impl LaneCpu {
    /// The conversion instructions this CPU has.
    #[inline(always)]
    pub fn detect() -> LaneCpu {
        #[cfg(target_arch = "x86_64")]
        let f16c = std::is_x86_feature_detected!("f16c");
        #[cfg(not(target_arch = "x86_64"))]
        let f16c = false;
        LaneCpu { f16c }
    }

    /// [`LaneCpu::detect`] where `T` converts in lanes; for the other types
    /// (whose conversions ignore it) nothing is detected.
    #[inline(always)]
    pub fn for_type<T: Element>() -> LaneCpu {
        if T::CONVERTS_IN_LANES {
            LaneCpu::detect()
        } else {
            LaneCpu { f16c: false }
        }
    }
}

impl Element for f32 {
    type Acc = f32;
    const RELU_BOUND: f32 = 0.0;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(v: f32) -> Self {
        v
    }
}

impl Element for f64 {
    type Acc = f64;
    const RELU_BOUND: f64 = 0.0;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(v: f64) -> Self {
        v
    }
}

impl Element for f16 {
    type Acc = f32;
    /// 2⁻²⁵.
    const RELU_BOUND: f32 = f32::from_bits(0x3300_0000);
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(v: f32) -> Self {
        f16::from_f32(v)
    }
    const CONVERTS_IN_LANES: bool = true;
    /// With F16C (as `cpu` says: a branch on a flag the compiler can take
    /// out of the loop, and the instruction inline where the caller enables
    /// `f16c`), one `vcvtph2ps`: the instruction `half` itself uses when
    /// the CPU has it; else `half`'s conversion per value.
    #[inline(always)]
    fn to_acc_lanes(xs: [f16; CONVERT_LANES], cpu: LaneCpu) -> [f32; CONVERT_LANES] {
        #[cfg(target_arch = "x86_64")]
        if cpu.f16c {
            // SAFETY: the CPU has F16C (and so AVX): `LaneCpu::detect` checked it.
            return unsafe { f16c::widen(xs) };
        }
        let _ = cpu;
        xs.map(f16::to_f32)
    }
    /// With F16C, one `vcvtps2ph` rounding to nearest even (as `half`
    /// does with F16C); else `half`'s conversion per value.
    #[inline(always)]
    fn from_acc_lanes(vs: [f32; CONVERT_LANES], cpu: LaneCpu) -> [f16; CONVERT_LANES] {
        #[cfg(target_arch = "x86_64")]
        if cpu.f16c {
            // SAFETY: the CPU has F16C (and so AVX): `LaneCpu::detect` checked it.
            return unsafe { f16c::narrow(vs) };
        }
        let _ = cpu;
        vs.map(f16::from_f32)
    }
    /// On the bits: `+0`, `-0` and every negative number, not negative NaN.
    #[inline(always)]
    fn not_positive(self) -> bool {
        let b = self.to_bits();
        b & 0x7FFF == 0 || (b & 0x8000 != 0 && b & 0x7FFF <= 0x7C00)
    }
}

/// The F16C conversions of eight f16 values, inlined into callers that
/// enable `f16c` (the kernels' AVX2 and AVX-512 tiers).
#[cfg(target_arch = "x86_64")]
mod f16c {
    use super::CONVERT_LANES;
    use half::f16;
    use std::arch::x86_64::_MM_FROUND_TO_NEAREST_INT;
    use std::arch::x86_64::{__m128i, __m256, _mm256_cvtph_ps, _mm256_cvtps_ph};

    /// f16 → f32, exact (NaN quieted, as `half` does).
    #[target_feature(enable = "avx,f16c")]
    #[inline]
    pub(super) fn widen(xs: [f16; CONVERT_LANES]) -> [f32; CONVERT_LANES] {
        // SAFETY: both are 16 plain bytes, every bit pattern valid.
        let v: __m128i = unsafe { std::mem::transmute(xs.map(f16::to_bits)) };
        // SAFETY: both are 32 plain bytes, every bit pattern valid.
        unsafe { std::mem::transmute::<__m256, [f32; CONVERT_LANES]>(_mm256_cvtph_ps(v)) }
    }

    /// f32 → f16, rounded to nearest even (NaN quieted, overflow to
    /// infinity, subnormals rounded exactly), whatever MXCSR says.
    #[target_feature(enable = "avx,f16c")]
    #[inline]
    pub(super) fn narrow(vs: [f32; CONVERT_LANES]) -> [f16; CONVERT_LANES] {
        // SAFETY: both are 32 plain bytes, every bit pattern valid.
        let v: __m256 = unsafe { std::mem::transmute(vs) };
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        // SAFETY: both are 16 plain bytes, every bit pattern valid.
        unsafe { std::mem::transmute::<__m128i, [u16; CONVERT_LANES]>(h) }.map(f16::from_bits)
    }
}

impl Element for bf16 {
    type Acc = f32;
    /// 2⁻¹³⁴ (an f32 subnormal).
    const RELU_BOUND: f32 = f32::from_bits(0x0000_8000);
    /// Exact: a bf16 is the high half of an f32.
    #[inline(always)]
    fn to_acc(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    /// Round to nearest even, NaN kept quiet: the same bits as
    /// `bf16::from_f32`, written without branches so the loops vectorize.
    #[inline(always)]
    fn from_acc(v: f32) -> Self {
        let x = v.to_bits();
        let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
        let nan = (x >> 16) | 0x0040;
        // One unordered compare of the f32 (the integer test of the
        // exponent and mantissa took two more vector operations).
        let bits = if v.is_nan() { nan } else { rounded };
        bf16::from_bits(bits as u16)
    }
}

/// `v` rounded to f32 toward zero with the last bit set when inexact
/// ("round to odd"): it keeps whether `v` lay between two f32 values, so a
/// second rounding to nearest into a format at least two bits narrower (f16,
/// bf16) gives the correctly rounded result of `v` itself. Infinite when `v`
/// is beyond f32's range, where f16 and bf16 overflow too.
fn f64_to_f32_odd(v: f64) -> f32 {
    let f = v as f32;
    if !f.is_finite() || f as f64 == v {
        return f;
    }
    let toward_zero = if (f as f64).abs() > v.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    f32::from_bits(toward_zero.to_bits() | 1)
}

/// `v` rounded to the nearest f16 (ties to even), as CUDA's `__double2half`.
/// `half`'s `f16::from_f64` rounds through f32 (or ignores the low 32 bits
/// of the mantissa), which differs in rare near-ties.
pub(crate) fn f16_from_f64(v: f64) -> f16 {
    f16::from_f32(f64_to_f32_odd(v))
}

/// `v` rounded to the nearest bf16 (ties to even), as CUDA's
/// `__double2bfloat16` (see [`f16_from_f64`]).
pub(crate) fn bf16_from_f64(v: f64) -> bf16 {
    bf16::from_f32(f64_to_f32_odd(v))
}

/// Runs `$body` with the type alias `$T` bound to the Rust type of a float
/// `DType` (f32, f64, f16, bf16); other dtypes evaluate `$other`.
macro_rules! with_float_type {
    ($dtype:expr, $T:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            candle::DType::F32 => {
                type $T = f32;
                $body
            }
            candle::DType::F64 => {
                type $T = f64;
                $body
            }
            candle::DType::F16 => {
                type $T = half::f16;
                $body
            }
            candle::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            _ => $other,
        }
    };
}
pub(crate) use with_float_type;

/// Splits f64 values into `hi + lo` of the accumulator type (`lo` is zero for f64).
pub(crate) fn split_means<A: Accum>(mean: &[f64]) -> (Vec<A>, Vec<A>) {
    let hi: Vec<A> = mean.iter().map(|&m| A::from_f64(m)).collect();
    let lo: Vec<A> = mean
        .iter()
        .zip(hi.iter())
        .map(|(&m, &h)| A::from_f64(m - h.to_f64()))
        .collect();
    (hi, lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The correctly rounded value of `v` among the finite values `below`
    /// and `above` (adjacent in the target format, `even` the one with an
    /// even last bit), computed exactly in f64 (the gaps are powers of two).
    fn nearest(v: f64, below: f64, above: f64, below_is_even: bool) -> f64 {
        let (d_below, d_above) = (v - below, above - v);
        if d_below < d_above || (d_below == d_above && below_is_even) {
            below
        } else {
            above
        }
    }

    #[test]
    fn f64_to_half_rounds_correctly_where_half_does_not() {
        // A tie of bf16 at 1 + 2^-8 plus 2^-40 (below f32's precision): the
        // nearest bf16 is above; rounding through f32 (or truncating the
        // low bits) sees an exact tie and goes to even, below.
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(bf16_from_f64(v).to_f64(), 1.0 + 2f64.powi(-7));
        let v = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(f16_from_f64(v).to_f64(), 1.0 + 2f64.powi(-10));
        // A sweep of f64 values near the f16 and bf16 rounding points,
        // with low bits that f32 cannot hold, against exact rounding.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let e = (state % 40) as i32 - 20;
            let m = 1.0 + (state >> 20) as f64 / (1u64 << 44) as f64;
            let sign = if state & 1 == 0 { 1.0 } else { -1.0 };
            let v = sign * m * 2f64.powi(e);
            // bf16: 8 significant bits.
            let b = bf16_from_f64(v).to_f64();
            let ulp = 2f64.powi(v.abs().log2().floor() as i32 - 7);
            let low = (v / ulp).floor() * ulp;
            let low_even = ((v / ulp).floor() as i64) % 2 == 0;
            assert_eq!(b, nearest(v, low, low + ulp, low_even), "bf16 of {v:e}");
            // f16: 11 significant bits (these exponents stay normal).
            if (-14..15).contains(&e) {
                let h = f16_from_f64(v).to_f64();
                let ulp = 2f64.powi(v.abs().log2().floor() as i32 - 10);
                let low = (v / ulp).floor() * ulp;
                let low_even = ((v / ulp).floor() as i64) % 2 == 0;
                assert_eq!(h, nearest(v, low, low + ulp, low_even), "f16 of {v:e}");
            }
        }
        // Exact values, infinities, NaN and overflow.
        for v in [
            0.0,
            -0.0,
            1.5,
            -2.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e300,
            -1e300,
        ] {
            assert_eq!(bf16_from_f64(v).to_f64(), bf16::from_f64(v).to_f64(), "{v}");
            assert_eq!(f16_from_f64(v).to_f64(), f16::from_f64(v).to_f64(), "{v}");
        }
        assert!(bf16_from_f64(f64::NAN).is_nan() && f16_from_f64(f64::NAN).is_nan());
    }

    #[test]
    fn bf16_conversions_match_half() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.5,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-40,
            -3e38,
        ];
        // Ties and near-ties around the rounding point, and a sweep of bit patterns.
        specials.extend(
            [
                0x3F80_8000u32,
                0x3F81_8000,
                0x3F80_7FFF,
                0x3F80_8001,
                0x7F7F_FFFF,
                0x7FC0_0001,
                0xFF80_0001,
            ]
            .map(f32::from_bits),
        );
        specials.extend(
            (0..1u64 << 32)
                .step_by(65_521)
                .map(|b| f32::from_bits(b as u32)),
        );
        // Every bf16 value with the low halves around its rounding point:
        // ties, one step off them, NaN payloads of every kind, subnormals and
        // the overflow past the largest finite value.
        specials.extend(rounding_edges(|h| Some((h as u32) << 16), 16));
        for v in specials {
            let ours = <bf16 as Element>::from_acc(v);
            let theirs = bf16::from_f32(v);
            assert_eq!(
                ours.to_bits(),
                theirs.to_bits(),
                "from_f32({v:e}) bits {:#x}",
                v.to_bits()
            );
            assert_eq!(
                <bf16 as Element>::to_acc(theirs).to_bits(),
                theirs.to_f32().to_bits()
            );
        }
    }

    /// f32 values whose rounding to f16 or bf16 is delicate: for every bit
    /// pattern `h` of the 16-bit format with `shift` bits below it in an f32
    /// (13 for f16, in its f32 position; 16 for bf16), the value `h` itself,
    /// the tie between it and the next one, one f32 step either side of the
    /// tie, and the last f32 before the next one. With every sign, exponent
    /// and mantissa, this covers subnormals, overflow and NaN payloads.
    fn rounding_edges(to_f32_bits: impl Fn(u16) -> Option<u32>, shift: u32) -> Vec<f32> {
        let half_step = 1u32 << (shift - 1);
        let mut vals = Vec::new();
        for h in 0..=u16::MAX {
            if let Some(b) = to_f32_bits(h) {
                for low in [
                    0,
                    half_step - 1,
                    half_step,
                    half_step + 1,
                    2 * half_step - 1,
                ] {
                    vals.push(f32::from_bits(b.wrapping_add(low)));
                }
            }
        }
        vals
    }

    /// The f32 bits of the f16 `h` in f16-to-f32 position (exponent rebiased,
    /// mantissa shifted by 13) for normal and infinite/NaN patterns; `None`
    /// for zero and subnormals, which f32 does not hold that way (their
    /// rounding edges come from [`f16_subnormal_edges`]).
    fn f16_position(h: u16) -> Option<u32> {
        let (sign, exp, man) = (
            (h as u32 & 0x8000) << 16,
            (h >> 10) & 0x1F,
            h as u32 & 0x3FF,
        );
        match exp {
            0 => None,
            0x1F => Some(sign | 0x7F80_0000 | man << 13),
            e => Some(sign | (e as u32 + 112) << 23 | man << 13),
        }
    }

    /// Rounding edges of the f16 subnormal range: every multiple of 2⁻²⁵
    /// (the values and the ties between f16 subnormals) below 2⁻¹⁴, one f32
    /// step either side, both signs, and f32 subnormals.
    fn f16_subnormal_edges() -> Vec<f32> {
        let mut vals = Vec::new();
        for k in 0..=2048u32 {
            let v = k as f32 * 2f32.powi(-25);
            for w in [
                v,
                f32::from_bits(v.to_bits() + 1),
                f32::from_bits(v.to_bits().saturating_sub(1)),
            ] {
                vals.extend([w, -w]);
            }
        }
        vals.extend([
            1e-45f32,
            -1e-45,
            1e-40,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
        ]);
        vals
    }

    /// The correctly rounded f16 of `v` (ties to even, overflow to infinity,
    /// NaN quieted with the top of its payload kept), worked out in f64 on
    /// the f16 grid, independently of `half` and of F16C.
    fn f16_reference(v: f32) -> u16 {
        let b = v.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        if v.is_nan() {
            return sign | 0x7E00 | ((b >> 13) & 0x3FF) as u16;
        }
        let a = (v as f64).abs();
        if a >= 65520.0 {
            return sign | 0x7C00;
        }
        // The spacing of f16 values around `a`: 2⁻²⁴ in the subnormals.
        let e = if a == 0.0 {
            -14
        } else {
            (a.log2().floor() as i32).max(-14)
        };
        let ulp = 2f64.powi(e - 10);
        let q = (a / ulp).round_ties_even() * ulp;
        let mag = if q < 2f64.powi(-14) {
            (q / 2f64.powi(-24)) as u16
        } else {
            let e = q.log2().floor() as i32;
            (((e + 15) as u16) << 10) | ((q / 2f64.powi(e - 10)) as u16 - 1024)
        };
        sign | mag
    }

    /// The f16 conversions in lanes (F16C where the CPU has it, else
    /// `half`'s) give the bits of `half`'s conversion of each value and of an
    /// independent reference: all 65,536 f16 bit patterns widened, and the
    /// rounding edges of every f16 value (ties, one step off them, the
    /// subnormal range, overflow, NaN payloads) plus a sweep of f32 bit
    /// patterns narrowed. `not_positive` agrees with widening and comparing.
    #[test]
    fn f16_lanes_convert_bit_for_bit_as_half() {
        #[cfg(target_arch = "x86_64")]
        if !std::is_x86_feature_detected!("f16c") {
            eprintln!("this CPU has no F16C: the lanes take half's conversions");
        }
        for base in (0..=u16::MAX as usize).step_by(CONVERT_LANES) {
            let xs: [f16; CONVERT_LANES] =
                std::array::from_fn(|l| f16::from_bits((base + l) as u16));
            let got = <f16 as Element>::to_acc_lanes(xs, LaneCpu::detect());
            for (x, y) in xs.into_iter().zip(got) {
                let h = x.to_bits();
                let want = match f16_position(h) {
                    Some(b) if x.is_nan() => b | 0x0040_0000,
                    Some(b) => b,
                    None => {
                        let v = (h & 0x3FF) as f32 * 2f32.powi(-24);
                        (if h & 0x8000 != 0 { -v } else { v }).to_bits()
                    }
                };
                assert_eq!(
                    y.to_bits(),
                    x.to_f32().to_bits(),
                    "widening {h:#06x} (half)"
                );
                assert_eq!(y.to_bits(), want, "widening {h:#06x} (reference)");
                assert_eq!(x.not_positive(), x.to_f32() <= 0.0, "not_positive {h:#06x}");
            }
        }
        let mut vals = rounding_edges(f16_position, 13);
        vals.extend(f16_subnormal_edges());
        vals.extend(
            [
                65504.0f32,
                65519.996,
                65520.0,
                65536.0,
                f32::MAX,
                f32::INFINITY,
            ]
            .map(|v| [v, -v])
            .concat(),
        );
        vals.extend(
            (0..1u64 << 32)
                .step_by(16_411)
                .map(|b| f32::from_bits(b as u32)),
        );
        for run in vals.chunks(CONVERT_LANES) {
            let mut lanes = [0f32; CONVERT_LANES];
            lanes[..run.len()].copy_from_slice(run);
            let got = <f16 as Element>::from_acc_lanes(lanes, LaneCpu::detect());
            for (&v, y) in lanes.iter().zip(got) {
                let b = v.to_bits();
                assert_eq!(
                    y.to_bits(),
                    f16::from_f32(v).to_bits(),
                    "narrowing {b:#010x} (half)"
                );
                assert_eq!(
                    y.to_bits(),
                    f16_reference(v),
                    "narrowing {b:#010x} (reference)"
                );
            }
        }
    }

    /// `RELU_BOUND` is where rounding to the element type crosses zero: every
    /// f32 at and around it, and a sweep of all f32 bit patterns.
    #[test]
    fn relu_bound_is_where_rounding_crosses_zero() {
        fn check<T: Element<Acc = f32>>() {
            let b = T::RELU_BOUND.to_bits();
            let mut vals: Vec<f32> = (b.saturating_sub(4)..=b + 4).map(f32::from_bits).collect();
            vals.extend([
                0.0,
                -0.0,
                f32::NAN,
                -f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                -1e-45,
            ]);
            vals.extend(
                (0..1u64 << 32)
                    .step_by(65_537)
                    .map(|b| f32::from_bits(b as u32)),
            );
            for v in vals {
                let rounded_not_positive = T::from_acc(v).to_acc() <= 0.0;
                assert_eq!(
                    rounded_not_positive,
                    v <= T::RELU_BOUND,
                    "{}: {v:e} (bits {:#x})",
                    std::any::type_name::<T>(),
                    v.to_bits()
                );
            }
        }
        check::<f32>();
        check::<f16>();
        check::<bf16>();
    }
}
