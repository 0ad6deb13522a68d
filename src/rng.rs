//! The counter-based random generator behind DARE and DELLA, shared bit for bit with WGSL
//! (`src/backend/gpu/kernels/prelude/rng.wgsl`).
//!
//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) keyed
//! by the seed; the counter is (element block, tensor-name hash, model index). The bits for an
//! element depend only on (seed, output tensor name, model index, element index): never on
//! tiles, threads or the device. Only 32-bit integer operations are used (the 32x32->64
//! multiply is done in 16-bit limbs) because WGSL has nothing wider.

pub const PHILOX_M0: u32 = 0xD251_1F53;
pub const PHILOX_M1: u32 = 0xCD9E_8D57;
pub const PHILOX_W0: u32 = 0x9E37_79B9;
pub const PHILOX_W1: u32 = 0xBB67_AE85;

/// (high, low) words of the 64-bit product a*b, from 16-bit limbs.
#[inline(always)]
pub fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let (ah, al) = (a >> 16, a & 0xffff);
    let (bh, bl) = (b >> 16, b & 0xffff);
    let ll = al * bl;
    let lh = al * bh;
    let hl = ah * bl;
    let hh = ah * bh;
    let mid = (ll >> 16) + (lh & 0xffff) + (hl & 0xffff);
    let lo = (mid << 16) | (ll & 0xffff);
    let hi = hh
        .wrapping_add(lh >> 16)
        .wrapping_add(hl >> 16)
        .wrapping_add(mid >> 16);
    (hi, lo)
}

/// The same product through the CPU's 64-bit multiplier: bit-identical to [`mulhilo`] (a
/// test checks), and what the CPU path runs.
#[inline(always)]
fn mulhilo_native(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

#[inline(always)]
fn philox_with(
    mut ctr: [u32; 4],
    mut key: [u32; 2],
    mul: impl Fn(u32, u32) -> (u32, u32),
) -> [u32; 4] {
    for r in 0..10 {
        if r > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W0);
            key[1] = key[1].wrapping_add(PHILOX_W1);
        }
        let (hi0, lo0) = mul(PHILOX_M0, ctr[0]);
        let (hi1, lo1) = mul(PHILOX_M1, ctr[2]);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
    }
    ctr
}

/// Philox4x32-10 exactly as the WGSL runs it (16-bit limb products).
pub fn philox4x32_10_limbs(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox_with(ctr, key, mulhilo)
}

#[inline(always)]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox_with(ctr, key, mulhilo_native)
}

/// FNV-1a, 32-bit, over the UTF-8 bytes.
pub fn fnv1a32(s: &str) -> u32 {
    let mut h: u32 = 0x811C_9DC5;
    for b in s.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The random stream of one (seed, tensor, model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    pub key: [u32; 2],
    pub name_hash: u32,
    pub model: u32,
}

impl Stream {
    pub fn new(seed: u64, tensor_name: &str, model: u32) -> Self {
        Stream {
            key: [seed as u32, (seed >> 32) as u32],
            name_hash: fnv1a32(tensor_name),
            model,
        }
    }

    /// Four 32-bit words for elements `4*block .. 4*block+4`.
    #[inline(always)]
    pub fn block(&self, block: u64) -> [u32; 4] {
        philox4x32_10(
            [
                block as u32,
                (block >> 32) as u32,
                self.name_hash,
                self.model,
            ],
            self.key,
        )
    }

    /// The uniform in [0, 1) of one element.
    #[inline]
    pub fn uniform_at(&self, index: u64) -> f32 {
        to_uniform(self.block(index / 4)[(index % 4) as usize])
    }
}

/// Blocks computed together by [`Stream::blocks`]: wide enough for the compiler to spread the
/// lanes over SIMD registers.
pub const LANES: usize = 16;

impl Stream {
    /// The words of blocks `first .. first + LANES`, lane-major: `out[w][l]` is word `w` of
    /// block `first + l` (so element `4·(first + l) + w`). Same bits as [`Stream::block`].
    #[inline]
    pub fn blocks(&self, first: u64) -> [[u32; LANES]; 4] {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            self.blocks_avx512(first)
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
        {
            self.blocks_portable(first)
        }
    }

    /// [`Stream::blocks`] on AVX-512: see [`Stream::rounds_avx512`].
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    fn blocks_avx512(&self, first: u64) -> [[u32; LANES]; 4] {
        use std::arch::x86_64::*;
        let words = self.rounds_avx512::<2>(first);
        let mut out = [[0u32; LANES]; 4];
        for (o, v) in out.iter_mut().zip(words) {
            // SAFETY: AVX-512F is enabled for this build; the store writes a whole 16-word array
            unsafe { _mm512_storeu_si512(o.as_mut_ptr() as *mut __m512i, narrow16(v[0], v[1])) };
        }
        out
    }

    /// The ten rounds for the `8·H` blocks from `first`: `out[w][h]` holds word w of blocks
    /// `first + 8h .. first + 8h + 8`, one block per 64-bit lane with the word in the low
    /// half. That layout lets `vpmuludq` give each whole 64-bit product at once (high word =
    /// a shift, low word = the lane as it is); the upper halves fill with junk that nothing
    /// reads, since the multiply and the final narrowing only look at the low halves. Several
    /// halves run side by side so that the rounds' multiply latencies overlap.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    #[inline(always)]
    fn rounds_avx512<const H: usize>(&self, first: u64) -> [[std::arch::x86_64::__m512i; H]; 4] {
        use std::arch::x86_64::*;
        // SAFETY: AVX-512F is enabled for this build (the cfg above); no memory is touched.
        unsafe {
            let set = |x: u32| _mm512_set1_epi32(x as i32);
            let lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
            // block numbers as 64-bit lanes: word 0 is their low half, word 1 the high half
            let mut c0: [__m512i; H] = std::array::from_fn(|h| {
                let at = first.wrapping_add(8 * h as u64);
                _mm512_add_epi64(_mm512_set1_epi64(at as i64), lane)
            });
            let mut c1: [__m512i; H] = c0.map(|c| _mm512_srli_epi64::<32>(c));
            let mut c2 = [set(self.name_hash); H];
            let mut c3 = [set(self.model); H];
            let (m0, m1) = (set(PHILOX_M0), set(PHILOX_M1));
            let mut key = self.key;
            for r in 0..10 {
                if r > 0 {
                    key[0] = key[0].wrapping_add(PHILOX_W0);
                    key[1] = key[1].wrapping_add(PHILOX_W1);
                }
                let (k0, k1) = (set(key[0]), set(key[1]));
                for h in 0..H {
                    let p0 = _mm512_mul_epu32(c0[h], m0);
                    let p1 = _mm512_mul_epu32(c2[h], m1);
                    // three-way xor of the high word, the other counter word and the key
                    c0[h] =
                        _mm512_ternarylogic_epi32::<0x96>(_mm512_srli_epi64::<32>(p1), c1[h], k0);
                    c2[h] =
                        _mm512_ternarylogic_epi32::<0x96>(_mm512_srli_epi64::<32>(p0), c3[h], k1);
                    c1[h] = p1;
                    c3[h] = p0;
                }
            }
            [c0, c1, c2, c3]
        }
    }

    /// Keep bits of the 64 elements `4·first .. 4·first + 64`: bit e is set when the top 24
    /// bits of element e's word are below `threshold(e)`.
    #[inline]
    pub fn keep_word_by(&self, first: u64, threshold: impl Fn(usize) -> u32) -> u64 {
        let w = self.blocks(first);
        let mut bits = 0u64;
        for l in 0..LANES {
            for (k, wk) in w.iter().enumerate() {
                let e = 4 * l + k;
                bits |= (((wk[l] >> 8) < threshold(e)) as u64) << e;
            }
        }
        bits
    }

    /// [`Stream::keep_word_by`] with one threshold `t` for every element (each kept with
    /// probability t / 2²⁴), for the four words of blocks `first`, `first + 16`, `first + 32`
    /// and `first + 48` (256 elements), computed together: four words keep the multipliers
    /// busy where one waits on each round's latency (measured: 2 words 8%, 4 words another 9%
    /// faster than 1; 8 words slower, out of registers).
    #[inline]
    pub fn keep_words(&self, first: u64, t: u32) -> [u64; 4] {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx512f",
            target_feature = "bmi2"
        ))]
        {
            use std::arch::x86_64::*;
            let words = self.rounds_avx512::<8>(first);
            let mut bits = [0u64; 4];
            for (w, v) in words.into_iter().enumerate() {
                for (g, b) in bits.iter_mut().enumerate() {
                    // SAFETY: AVX-512F and BMI2 are enabled for this build (the cfg above).
                    unsafe {
                        let below = _mm512_cmplt_epu32_mask(
                            _mm512_srli_epi32::<8>(narrow16(v[2 * g], v[2 * g + 1])),
                            _mm512_set1_epi32(t as i32),
                        );
                        // lane l is element 4l + w
                        *b |= _pdep_u64(below as u64, 0x1111_1111_1111_1111 << w);
                    }
                }
            }
            bits
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx512f",
            target_feature = "bmi2"
        )))]
        {
            std::array::from_fn(|g| self.keep_word_by(first.wrapping_add(16 * g as u64), |_| t))
        }
    }

    #[cfg_attr(
        all(target_arch = "x86_64", target_feature = "avx512f"),
        allow(dead_code)
    )]
    #[allow(clippy::needless_range_loop)]
    fn blocks_portable(&self, first: u64) -> [[u32; LANES]; 4] {
        let mut c = [[0u32; LANES]; 4];
        for l in 0..LANES {
            let b = first + l as u64;
            c[0][l] = b as u32;
            c[1][l] = (b >> 32) as u32;
            c[2][l] = self.name_hash;
            c[3][l] = self.model;
        }
        let mut key = self.key;
        for r in 0..10 {
            if r > 0 {
                key[0] = key[0].wrapping_add(PHILOX_W0);
                key[1] = key[1].wrapping_add(PHILOX_W1);
            }
            let mut n = [[0u32; LANES]; 4];
            for l in 0..LANES {
                let p0 = PHILOX_M0 as u64 * c[0][l] as u64;
                let p1 = PHILOX_M1 as u64 * c[2][l] as u64;
                n[0][l] = (p1 >> 32) as u32 ^ c[1][l] ^ key[0];
                n[1][l] = p1 as u32;
                n[2][l] = (p0 >> 32) as u32 ^ c[3][l] ^ key[1];
                n[3][l] = p0 as u32;
            }
            c = n;
        }
        c
    }
}

/// The low words of two registers of eight 64-bit lanes, as one register of 16 words.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
#[inline(always)]
fn narrow16(
    lo: std::arch::x86_64::__m512i,
    hi: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512F is enabled for this build (the cfg above); registers only.
    unsafe {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)),
            _mm512_cvtepi64_epi32(hi),
        )
    }
}

/// Top 24 bits as a float in [0, 1): exact in f32, the same on every device.
#[inline(always)]
pub fn to_uniform(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn limb_multiply_matches_u64() {
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let y = x.rotate_left(13) ^ 0xdead_beef;
            let p = x as u64 * y as u64;
            assert_eq!(mulhilo(x, y), ((p >> 32) as u32, p as u32));
        }
        assert_eq!(mulhilo(u32::MAX, u32::MAX), (0xffff_fffe, 1));
    }

    #[test]
    fn limb_and_native_philox_agree() {
        let mut c = [1u32, 2, 3, 4];
        for i in 0..10_000u32 {
            c = [
                c[0].wrapping_mul(747796405).wrapping_add(i),
                c[1] ^ i,
                c[2].rotate_left(7),
                c[3].wrapping_add(c[0]),
            ];
            let k = [c[3] ^ 0x5555, c[1].wrapping_mul(3)];
            assert_eq!(philox4x32_10(c, k), philox4x32_10_limbs(c, k));
        }
        assert_eq!(
            philox4x32_10_limbs(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn lane_blocks_match_single_blocks() {
        let s = Stream::new(0x1234_5678_9abc_def0, "x", 3);
        for first in [0u64, 5, (1 << 32) - 5, 1 << 32, u64::MAX - 100] {
            let b = s.blocks(first);
            assert_eq!(b, s.blocks_portable(first), "block {first}");
            for l in 0..LANES {
                let one = s.block(first.wrapping_add(l as u64));
                assert_eq!(
                    [b[0][l], b[1][l], b[2][l], b[3][l]],
                    one,
                    "block {first} + {l}"
                );
            }
        }
    }

    #[test]
    fn keep_words_match_single_elements() {
        let s = Stream::new(0x0bad_cafe_f00d_d00d, "layers.3.w", 2);
        for first in [0u64, 16, (1 << 32) - 5, u64::MAX - 100] {
            for t in [0u32, 1, 1 << 20, 5_000_000, (1 << 24) - 1, 1 << 24] {
                let four = s.keep_words(first, t);
                let w = four[0];
                for (g, got) in four.iter().enumerate() {
                    let at = first.wrapping_add(16 * g as u64);
                    assert_eq!(*got, s.keep_word_by(at, |_| t), "block {at}, t {t}");
                }
                for e in 0..64u64 {
                    let word = s.block(first.wrapping_add(e / 4))[(e % 4) as usize];
                    assert_eq!(
                        w >> e & 1 == 1,
                        (word >> 8) < t,
                        "block {first}, t {t}, e {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn fnv_reference_values() {
        assert_eq!(fnv1a32(""), 0x811c9dc5);
        assert_eq!(fnv1a32("a"), 0xe40c292c);
        assert_eq!(fnv1a32("foobar"), 0xbf9cf968);
    }

    #[test]
    fn uniform_is_uniform() {
        let s = Stream::new(42, "model.layers.0.mlp.up_proj.weight", 1);
        let n = 200_000u64;
        let mean: f64 = (0..n).map(|i| s.uniform_at(i) as f64).sum::<f64>() / n as f64;
        assert!(
            (mean - 0.5).abs() < 4.0 * (1.0f64 / 12.0 / n as f64).sqrt(),
            "{mean}"
        );
        let kept = (0..n).filter(|&i| s.uniform_at(i) < 0.3).count() as f64 / n as f64;
        assert!(
            (kept - 0.3).abs() < 4.0 * (0.21f64 / n as f64).sqrt(),
            "{kept}"
        );
        // different model index or name gives a different stream
        assert_ne!(
            s.block(0),
            Stream::new(42, "model.layers.0.mlp.up_proj.weight", 2).block(0)
        );
        assert_ne!(
            s.block(0),
            Stream::new(42, "model.layers.1.mlp.up_proj.weight", 1).block(0)
        );
        assert_ne!(
            s.block(0),
            Stream::new(43, "model.layers.0.mlp.up_proj.weight", 1).block(0)
        );
    }
}
