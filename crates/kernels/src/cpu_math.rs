//! Vectorised f32 `exp` for the CPU loops of the decoder's fused ops (the masked softmax and
//! SwiGLU). Rust's `f32::exp` is a scalar libm call per value (~2.5 ns here); these loops run
//! it on every attention score and every MLP activation of every layer, so on the CPU they
//! cost about as much as the attention's matrix products. [`exp_in_place`] is a branch-free
//! polynomial (Cephes' `expf`: range reduction by ln 2 in two parts, a degree-6 polynomial,
//! the exponent put back through the bits), written so the compiler vectorises it: AVX2 + FMA
//! chosen at run time where the CPU has them, SSE2 otherwise.
//!
//! Accuracy: within 2 ulp of the correctly rounded exp over the normal range (tested against
//! f64); inputs below -87.3365 (e^x under f32's smallest normal, -inf included) give exactly
//! 0, which is what the masked cells need; inputs above 88 give e^88 (callers only pass
//! x <= 0, or -gate for SiLU where the result is only used as 1 + e^x in a denominator); NaN
//! stays NaN.

/// Smallest input with a normal result; below it (and -inf) the result is 0.
const MIN_X: f32 = -87.336_55;
/// Largest input used (e^88 = 1.65e38 < f32::MAX); larger inputs are clamped to it.
const MAX_X: f32 = 88.0;

#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5 * 2^23 trick: branch-free, and exact for |n| < 2^22.
    const ROUND: f32 = 12_582_912.0;
    // (No float -> int conversion anywhere: Rust's saturating `as i32` does not vectorise.)
    let xc = x.clamp(MIN_X, MAX_X);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let y = p * (r * r) + r + 1.0;
    // 2^n for n in [-126, 127]: n is t's low mantissa bits (t = 1.5 * 2^23 + n), so the
    // biased exponent is (bits(t) - bits(1.5 * 2^23) + 127) << 23, in wrapping u32 arithmetic.
    let e = t
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127)
        .wrapping_shl(23);
    let out = if x < MIN_X {
        0.0
    } else {
        y * f32::from_bits(e)
    };
    if x.is_nan() {
        x
    } else {
        out
    }
}

fn exp_generic(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp_lane(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp_lane(*v);
    }
}

/// `x[i] = e^x[i]` for every element (see the module notes for the accuracy and range).
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { exp_avx2(x) };
        return;
    }
    exp_generic(x)
}

/// Sum of `x` in 8 interleaved f32 partial sums (vectorisable; the order differs from a
/// left-to-right sum by a few ulp).
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Largest element of `x` (-inf when empty), in 8 interleaved lanes (vectorisable). NaN
/// elements are skipped (a NaN score still turns its softmax row into NaN through exp).
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder() {
        m = if v > m { v } else { m };
    }
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(m, |m, &a| if a > m { a } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_diff(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_matches_f64_within_2_ulp() {
        // A dense sweep of the normal range, both paths.
        let xs: Vec<f32> = (0..200_001)
            .map(|i| MIN_X + (MAX_X - MIN_X) * i as f32 / 200_000.0)
            .chain([0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 0.5, -0.5, 10.0, -10.0])
            .collect();
        for path in [exp_in_place as fn(&mut [f32]), exp_generic] {
            let mut y = xs.clone();
            path(&mut y);
            let mut worst = 0;
            for (&x, &e) in xs.iter().zip(&y) {
                let want = (x as f64).exp() as f32;
                let d = ulp_diff(e, want);
                worst = worst.max(d);
                assert!(d <= 2, "exp({x}) = {e}, want {want} ({d} ulp)");
            }
            assert!(worst <= 2);
        }
    }

    #[test]
    fn exp_edges() {
        let mut y = vec![
            f32::NEG_INFINITY,
            -1000.0,
            -87.4,
            MIN_X,
            88.0,
            100.0,
            f32::INFINITY,
            f32::NAN,
        ];
        exp_in_place(&mut y);
        assert_eq!(&y[..3], &[0.0, 0.0, 0.0]);
        assert!(y[3] > 0.0 && y[3] < 1.2e-38, "{}", y[3]);
        assert!((y[4] / 88f64.exp() as f32 - 1.0).abs() < 1e-6);
        assert_eq!(y[5], y[4]);
        assert_eq!(y[6], y[4]);
        assert!(y[7].is_nan());
        // Lengths that are not multiples of the vector width.
        for n in [0usize, 1, 7, 9, 33] {
            let x: Vec<f32> = (0..n).map(|i| -(i as f32) / 3.0).collect();
            let mut v = x.clone();
            exp_in_place(&mut v);
            for (x, e) in x.iter().zip(&v) {
                assert!(
                    ulp_diff(*e, (*x as f64).exp() as f32) <= 2,
                    "exp({x}) = {e}"
                );
            }
        }
    }

    #[test]
    fn max_of_lanes() {
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        for n in [1usize, 7, 8, 9, 100] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 11) as f32 - (i == n / 2) as u8 as f32 * -20.0)
                .collect();
            let want = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&v), want, "n={n}");
        }
        assert_eq!(max(&[f32::NEG_INFINITY, -3.0, f32::NAN]), -3.0);
    }

    #[test]
    fn sum_matches_f64() {
        for n in [0usize, 1, 7, 8, 9, 100, 1001] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 * 0.1).collect();
            let want: f64 = v.iter().map(|&x| x as f64).sum();
            assert!(
                (sum(&v) as f64 - want).abs() <= 1e-5 * want.max(1.0),
                "n={n}"
            );
        }
    }
}
