//! A small, seedable pseudo-random number generator: the one the
//! examples' training loops, the simulator, the benchmarks and the tests
//! use, so runs are reproducible. Its state is serde-serializable, so a
//! training loop can checkpoint it.
//!
//! [`Rng`] is xoshiro256++ (Blackman & Vigna, 2019) seeded through
//! splitmix64, so that any `u64` seed (including 0) gives a well-mixed,
//! non-zero state. It is deterministic across platforms and not
//! cryptographically secure.

/// One step of splitmix64: advances `state` and returns the next output.
///
/// ```
/// use ckpt_core::rng::splitmix64;
/// let mut s = 0;
/// assert_eq!(splitmix64(&mut s), 0xe220_a839_7b1d_cdaf);
/// ```
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` deterministic pseudo-random bytes: the same `(len, seed)` always
/// gives the same bytes; different seeds give unrelated ones.
///
/// ```
/// use ckpt_core::rng::pattern;
/// assert_eq!(pattern(100, 7), pattern(100, 7));
/// assert_ne!(pattern(100, 7), pattern(100, 8));
/// ```
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::seed_from_u64(seed).fill(&mut v);
    v
}

/// xoshiro256++ generator.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Seeds the generator from one `u64` through splitmix64.
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    /// Uses `state` as the raw xoshiro256++ state. An all-zero state would
    /// only ever produce zeros, so it is replaced by the seed-0 state.
    pub fn from_state(state: [u64; 4]) -> Self {
        if state == [0; 4] {
            Self::seed_from_u64(0)
        } else {
            Self { s: state }
        }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            w.copy_from_slice(&self.next_u64().to_le_bytes()[..w.len()]);
        }
    }

    /// Uniform in `lo..hi` (`lo` if the range is empty). The modulo bias
    /// is below 2^-40 for ranges under 2^24, which is all its users need.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % hi.saturating_sub(lo).max(1)
    }

    /// Uniform `f64` in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Exponentially distributed sample with the given `mean`
    /// (inverse-CDF method). A non-finite or non-positive mean yields
    /// `f64::INFINITY` for an infinite mean and `0.0` otherwise.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        if mean.is_infinite() && mean > 0.0 {
            return f64::INFINITY;
        }
        if mean.is_nan() || mean <= 0.0 {
            return 0.0;
        }
        // 1 - u lies in (0, 1], so the logarithm is finite.
        -(1.0 - self.next_f64()).ln() * mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_outputs() {
        let mut s = 0;
        assert_eq!(splitmix64(&mut s), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(&mut s), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(splitmix64(&mut s), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn xoshiro_first_output_matches_definition() {
        // With state [1, 2, 3, 4]: rotl(1 + 4, 23) + 1.
        let mut r = Rng::from_state([1, 2, 3, 4]);
        assert_eq!(r.next_u64(), 41_943_041);
    }

    #[test]
    fn zero_state_is_replaced() {
        let mut r = Rng::from_state([0; 4]);
        assert_ne!(r.next_u64(), 0);
    }

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let mut a = Rng::seed_from_u64(7);
        let mut b = Rng::seed_from_u64(7);
        let mut c = Rng::seed_from_u64(8);
        let va: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let vb: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let vc: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
    }

    #[test]
    fn uniform_and_exponential_moments() {
        let mut r = Rng::seed_from_u64(42);
        let n = 200_000;
        let mut sum_u = 0.0;
        let mut sum_e = 0.0;
        let mut sum_e2 = 0.0;
        for _ in 0..n {
            let u = r.next_f64();
            assert!((0.0..1.0).contains(&u));
            sum_u += u;
            let e = r.exponential(3.0);
            assert!(e >= 0.0 && e.is_finite());
            sum_e += e;
            sum_e2 += e * e;
        }
        let nf = n as f64;
        assert!((sum_u / nf - 0.5).abs() < 0.005);
        let mean = sum_e / nf;
        let var = sum_e2 / nf - mean * mean;
        assert!((mean - 3.0).abs() < 0.05, "mean {mean}");
        assert!((var - 9.0).abs() < 0.4, "var {var}");
    }

    #[test]
    fn exponential_degenerate_means() {
        let mut r = Rng::seed_from_u64(1);
        assert_eq!(r.exponential(f64::INFINITY), f64::INFINITY);
        assert_eq!(r.exponential(0.0), 0.0);
        assert_eq!(r.exponential(-1.0), 0.0);
        assert_eq!(r.exponential(f64::NAN), 0.0);
    }
}
