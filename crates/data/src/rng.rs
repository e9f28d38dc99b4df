//! Keyed randomness: every random draw in llm4dsr comes from a generator derived from
//! (seed, purpose, key), never from a global stream. A stage that processes users in any
//! order, on any number of ranks, therefore makes exactly the same draws.

/// Why a generator is drawn. Distinct purposes give independent streams for the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Purpose {
    /// Synthetic dataset noise: which interactions are replaced, and by what (key = user).
    Noise = 1,
    /// SFT instances: which position is swapped, and the intruder (key = window id).
    SftSwap = 2,
    /// Sampling of SFT windows (key = window id).
    SftSample = 3,
    /// Backbone weight initialisation (key = parameter index).
    Init = 4,
    /// Backbone training: shuffling, negatives, dropout (key = epoch, step, ...).
    Train = 5,
    /// Anything else a later stage needs; put the sub-purpose in the key.
    Other = 99,
}

/// SplitMix64 finaliser: a bijective 64-bit mixer with good avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small, fast, deterministic generator (xoshiro256**), seeded from (seed, purpose, key).
/// Its output is fixed by this file, not by a crate version, so datasets stay byte-identical.
#[derive(Clone, Debug)]
pub struct KeyedRng {
    s: [u64; 4],
}

impl KeyedRng {
    pub fn new(seed: u64, purpose: Purpose, key: u64) -> Self {
        let mut x = mix64(seed ^ mix64(purpose as u64 ^ mix64(key)));
        let mut s = [0u64; 4];
        for v in s.iter_mut() {
            x = mix64(x);
            *v = x;
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Self { s }
    }

    /// Derive from two keys (e.g. user and position).
    pub fn new2(seed: u64, purpose: Purpose, key: u64, key2: u64) -> Self {
        Self::new(seed, purpose, mix64(key) ^ key2.rotate_left(32))
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, 1) as f32.
    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform integer in [0, n) without modulo bias (Lemire's method). `n` must be > 0.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "KeyedRng::below(0)");
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let lo = m as u64;
            if lo >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// In-place Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_stream_different_purpose_different_stream() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = KeyedRng::new(42, Purpose::Noise, 7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = KeyedRng::new(42, Purpose::Noise, 7);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut r = KeyedRng::new(42, Purpose::SftSwap, 7);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = KeyedRng::new(1, Purpose::Other, 0);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            counts[r.below(10) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
