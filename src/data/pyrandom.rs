//! CPython's `random` module (MT19937 + its seeding and derived draws), bit for bit.
//!
//! sd-scripts reseeds the *global* Python RNG every epoch (`random.seed(seed + epoch)`) and draws
//! every per-item augmentation (flip, crop offset, caption shuffle, dropout) from it, so reproducing
//! its epoch order needs the exact stream. spec: sdscripts_cli_data.md §6.2.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The 32-bit Mersenne Twister shared by CPython (`random`) and libtorch (`at::mt19937`).
#[derive(Clone)]
pub struct Mt19937 {
    mt: [u32; N],
    mti: usize,
}

impl Mt19937 {
    /// `init_genrand`: the plain 32-bit seeding (libtorch's `mt19937(seed)` uses this one).
    pub fn from_u32(s: u32) -> Self {
        let mut mt = [0u32; N];
        mt[0] = s;
        for i in 1..N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { mt, mti: N }
    }

    /// `init_by_array`: CPython's seeding from the 32-bit words of the seed.
    pub fn from_key(key: &[u32]) -> Self {
        let mut s = Self::from_u32(19_650_218);
        let mt = &mut s.mt;
        let mut i = 1usize;
        let mut j = 0usize;
        let klen = key.len().max(1);
        let mut k = N.max(klen);
        while k > 0 {
            let kj = key.get(j).copied().unwrap_or(0);
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(kj)
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= klen {
                j = 0;
            }
            k -= 1;
        }
        k = N - 1;
        while k > 0 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            k -= 1;
        }
        mt[0] = 0x8000_0000;
        s
    }

    fn twist(&mut self) {
        let mt = &mut self.mt;
        for kk in 0..N {
            let y = (mt[kk] & UPPER_MASK) | (mt[(kk + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            mt[kk] = mt[(kk + M) % N] ^ (y >> 1) ^ mag;
        }
        self.mti = 0;
    }

    /// `genrand_uint32`.
    pub fn next_u32(&mut self) -> u32 {
        if self.mti >= N {
            self.twist();
        }
        let mut y = self.mt[self.mti];
        self.mti += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// One instance of CPython's `random.Random`.
#[derive(Clone)]
pub struct PyRandom {
    mt: Mt19937,
}

impl PyRandom {
    /// `random.seed(n)` for a Python int `n` (abs value split into little-endian 32-bit words).
    pub fn new(seed: i128) -> Self {
        let mut a = seed.unsigned_abs();
        let mut key = Vec::new();
        while a > 0 {
            key.push(a as u32);
            a >>= 32;
        }
        if key.is_empty() {
            key.push(0);
        }
        PyRandom {
            mt: Mt19937::from_key(&key),
        }
    }

    /// `random.seed(n)` on an existing instance (sd-scripts reseeds the global RNG in place).
    pub fn seed(&mut self, seed: i128) {
        *self = Self::new(seed);
    }

    /// `random.random()`: 53-bit float in [0, 1).
    pub fn random(&mut self) -> f64 {
        let a = (self.mt.next_u32() >> 5) as f64;
        let b = (self.mt.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `random.getrandbits(k)` for k ≤ 128.
    pub fn getrandbits(&mut self, k: u32) -> u128 {
        assert!(k <= 128, "getrandbits beyond 128 bits is not needed here");
        if k == 0 {
            return 0;
        }
        if k <= 32 {
            return (self.mt.next_u32() >> (32 - k)) as u128;
        }
        // CPython fills 32-bit words from the least significant end; the last word keeps its
        // top bits only.
        let mut out: u128 = 0;
        let mut remaining = k;
        let mut shift = 0;
        while remaining > 0 {
            let mut r = self.mt.next_u32();
            if remaining < 32 {
                r >>= 32 - remaining;
            }
            out |= (r as u128) << shift;
            shift += 32;
            remaining = remaining.saturating_sub(32);
        }
        out
    }

    /// `Random._randbelow(n)`: rejection sampling on `n.bit_length()` bits.
    pub fn randbelow(&mut self, n: u128) -> u128 {
        assert!(n > 0, "randbelow(0)");
        let k = 128 - n.leading_zeros();
        let mut r = self.getrandbits(k);
        while r >= n {
            r = self.getrandbits(k);
        }
        r
    }

    /// `random.randint(a, b)`, both ends inclusive.
    pub fn randint(&mut self, a: i64, b: i64) -> i64 {
        assert!(b >= a, "randint({a}, {b}): empty range");
        let width = (b as i128 - a as i128 + 1) as u128;
        (a as i128 + self.randbelow(width) as i128) as i64
    }

    /// `random.randrange(start, stop)`.
    pub fn randrange(&mut self, start: i64, stop: i64) -> i64 {
        assert!(stop > start, "randrange({start}, {stop}): empty range");
        self.randint(start, stop - 1)
    }

    /// `random.uniform(a, b)`.
    pub fn uniform(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.random()
    }

    /// `random.choice(seq)` as an index into a non-empty sequence of length `len`.
    pub fn choice_index(&mut self, len: usize) -> usize {
        self.randbelow(len as u128) as usize
    }

    /// `random.shuffle(x)`: Fisher–Yates from the end.
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i as u128 + 1) as usize;
            x.swap(i, j);
        }
    }
}

/// libtorch's CPU generator (`at::CPUGeneratorImpl`): a 32-bit-seeded MT19937.
///
/// Only what sd-scripts' sampler needs: `torch.Generator().manual_seed(s)` then
/// `torch.randperm(n, generator=g)` (spec §6.3.4, §6.5).
#[derive(Clone)]
pub struct TorchCpuGenerator {
    mt: Mt19937,
}

impl TorchCpuGenerator {
    /// `manual_seed(seed)`: libtorch keeps the full seed but seeds the engine with its low 32 bits.
    pub fn new(seed: u64) -> Self {
        TorchCpuGenerator {
            mt: Mt19937::from_u32(seed as u32),
        }
    }

    /// `generator->random()`.
    pub fn random_u32(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// CPU `randperm(n)` for n < 2^32/20: swap position i with `i + random() % (n - i)`.
    pub fn randperm(&mut self, n: usize) -> Vec<usize> {
        assert!(
            (n as u64) < (u32::MAX as u64) / 20,
            "randperm beyond 2^32/20 elements uses another algorithm"
        );
        let mut r: Vec<usize> = (0..n).collect();
        for i in 0..n.saturating_sub(1) {
            let z = (self.mt.next_u32() as u64 % (n - i) as u64) as usize;
            r.swap(i, i + z);
        }
        r
    }
}

/// The generator's full state, for `--save_state` / `--resume` (`random.getstate()`).
impl PyRandom {
    pub fn getstate(&self) -> (Vec<u32>, usize) {
        (self.mt.mt.to_vec(), self.mt.mti)
    }

    pub fn setstate(&mut self, words: &[u32], index: usize) -> anyhow::Result<()> {
        if words.len() != N || index > N {
            anyhow::bail!(
                "Python random state: expected {N} words and an index ≤ {N}, got {} and {index}",
                words.len()
            );
        }
        self.mt.mt.copy_from_slice(words);
        self.mt.mti = index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_mt19937_init_genrand_5489() {
        // The first output of the reference MT19937 with the default seed 5489 (std::mt19937).
        let mut mt = Mt19937::from_u32(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut r = PyRandom::new(3);
        let mut v: Vec<u32> = (0..100).collect();
        r.shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(v, s);
    }
}
