//! Element types and the f32 <-> f16/bf16 conversions.
//!
//! The conversions are written with integer operations on the bit patterns (no `half`
//! intrinsics) so that the WGSL copies in `src/backend/gpu/kernels/prelude/common.wgsl` can
//! do exactly the same thing: round-to-nearest-even, subnormals kept, NaN kept quiet with its
//! sign.

use std::fmt;

use rayon::prelude::*;

/// Element type of a tensor as stored in a safetensors file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool | DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    /// The name used in safetensors headers.
    pub fn st_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U64 => "U64",
            DType::U32 => "U32",
            DType::U16 => "U16",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
        }
    }

    pub fn from_st_name(s: &str) -> Option<DType> {
        Some(match s {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U64" => DType::U64,
            "U32" => DType::U32,
            "U16" => DType::U16,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E5M2" => DType::F8E5M2,
            _ => return None,
        })
    }

    /// Parses the names recipes use (`bfloat16`, `float16`, `float32` and the short forms).
    pub fn from_recipe_name(s: &str) -> Option<DType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "float32" | "fp32" | "f32" | "float" => DType::F32,
            "float16" | "fp16" | "f16" | "half" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            _ => return None,
        })
    }

    /// The name `transformers` uses in config.json (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U64 => "uint64",
            DType::U32 => "uint32",
            DType::U16 => "uint16",
            DType::U8 => "uint8",
            DType::Bool => "bool",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
        }
    }

    /// The float types the merge engine reads and writes.
    pub fn is_mergeable(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Small integer code shared with the shaders.
    pub fn code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            _ => u32::MAX,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.st_name())
    }
}

/// f32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        return ((b >> 16) | 0x0040) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 -> f16 bits, round to nearest even, with subnormals, overflow to infinity and quiet NaN.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let a = b & 0x7fff_ffff;
    let h = if a >= 0x7f80_0000 {
        // Inf or NaN (NaN keeps its top payload bits and is made quiet).
        if a > 0x7f80_0000 {
            0x7e00 | ((a >> 13) & 0x3ff)
        } else {
            0x7c00
        }
    } else if a >= 0x477f_f000 {
        // >= 65520 rounds to infinity.
        0x7c00
    } else if a >= 0x3880_0000 {
        // Normal range: rebias the exponent, round the 13 dropped mantissa bits.
        let v = a - 0x3800_0000;
        (v + 0x0fff + ((v >> 13) & 1)) >> 13
    } else if a <= 0x3300_0000 {
        // <= 2^-25: rounds to zero (2^-25 is the tie, and zero is even).
        0
    } else {
        // Subnormal result: k = value / 2^-24, rounded to nearest even.
        let e = a >> 23;
        let m = (a & 0x007f_ffff) | 0x0080_0000;
        let s = 126 - e;
        let k = m >> s;
        let rem = m & ((1u32 << s) - 1);
        let half = 1u32 << (s - 1);
        if rem > half || (rem == half && (k & 1) == 1) {
            k + 1
        } else {
            k
        }
    };
    (sign | h) as u16
}

#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let e = (h >> 10) & 0x1f;
    let m = h & 0x3ff;
    if e == 0 {
        // Zero or subnormal: m * 2^-24, exact in f32.
        let v = m as f32 * (1.0 / 16_777_216.0);
        f32::from_bits(v.to_bits() | sign)
    } else if e == 31 {
        f32::from_bits(sign | 0x7f80_0000 | (m << 13))
    } else {
        f32::from_bits(sign | ((e + 112) << 23) | (m << 13))
    }
}

/// Decodes little-endian `src` bytes of `dtype` into `dst` (same element count).
pub fn decode(dtype: DType, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * dtype.size());
    decode_each(dtype, src, dst.iter_mut(), |d, v| *d = v);
}

/// [`decode`] and then `dst[j] -= base[j]`, in one pass (the same values).
pub fn decode_minus(dtype: DType, src: &[u8], base: &[f32], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * dtype.size());
    debug_assert_eq!(base.len(), dst.len());
    decode_each(dtype, src, dst.iter_mut().zip(base), |(d, b), v| {
        *d = v - *b
    });
}

/// Hands each element of `src`, decoded, to `put` together with the matching item of `dst`
/// (one loop per dtype, each simple enough to vectorise once `put` is inlined).
#[inline(always)]
fn decode_each<T>(dtype: DType, src: &[u8], dst: impl Iterator<Item = T>, put: impl Fn(T, f32)) {
    match dtype {
        DType::F32 => {
            for (d, s) in dst.zip(src.chunks_exact(4)) {
                put(d, f32::from_le_bytes([s[0], s[1], s[2], s[3]]));
            }
        }
        DType::BF16 => {
            for (d, s) in dst.zip(src.chunks_exact(2)) {
                put(d, bf16_to_f32(u16::from_le_bytes([s[0], s[1]])));
            }
        }
        DType::F16 => {
            for (d, s) in dst.zip(src.chunks_exact(2)) {
                put(d, f16_to_f32(u16::from_le_bytes([s[0], s[1]])));
            }
        }
        other => unreachable!("decode of non-float dtype {other}"),
    }
}

/// Rounds every value to the nearest value representable in `dtype` (a no-op for F32).
/// This is how a recipe's `dtype: bfloat16` is honoured: inputs are loaded at that precision.
pub fn quantize(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::F32 => {}
        DType::BF16 => v.iter_mut().for_each(|x| *x = bf16_to_f32(f32_to_bf16(*x))),
        DType::F16 => v.iter_mut().for_each(|x| *x = f16_to_f32(f32_to_f16(*x))),
        other => unreachable!("quantize to non-float dtype {other}"),
    }
}

/// Encodes `src` into little-endian bytes of `dtype`.
pub fn encode(dtype: DType, src: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            debug_assert_eq!(dst.len(), src.len() * 4);
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        DType::BF16 => {
            debug_assert_eq!(dst.len(), src.len() * 2);
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&f32_to_bf16(*s).to_le_bytes());
            }
        }
        DType::F16 => {
            debug_assert_eq!(dst.len(), src.len() * 2);
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&f32_to_f16(*s).to_le_bytes());
            }
        }
        other => unreachable!("encode to non-float dtype {other}"),
    }
}

/// Index and value of the first NaN or infinity in little-endian `bytes` of `dtype`.
pub fn first_nonfinite(dtype: DType, bytes: &[u8]) -> Option<(usize, f32)> {
    // all-ones exponent: infinity or NaN
    let hit = match dtype {
        DType::F32 => scan_exponents::<4>(bytes, 0x7f80_0000, |b| u32::from_le_bytes(*b)),
        DType::BF16 => scan_exponents::<2>(bytes, 0x7f80, |b| u16::from_le_bytes(*b) as u32),
        DType::F16 => scan_exponents::<2>(bytes, 0x7c00, |b| u16::from_le_bytes(*b) as u32),
        _ => None,
    }?;
    let s = dtype.size();
    let mut v = [0f32; 1];
    decode(dtype, &bytes[hit * s..(hit + 1) * s], &mut v);
    Some((hit, v[0]))
}

/// The first element whose `bits & mask == mask`, in parallel blocks; each block of 256
/// elements is tested branch-free (vectorised) and searched only when it has a hit.
fn scan_exponents<const S: usize>(
    bytes: &[u8],
    mask: u32,
    bits: impl Fn(&[u8; S]) -> u32 + Sync,
) -> Option<usize> {
    const BLOCK: usize = 1 << 16;
    const SUB: usize = 256;
    let (elems, _) = bytes.as_chunks::<S>();
    elems
        .par_chunks(BLOCK)
        .enumerate()
        .find_map_first(|(c, chunk)| {
            chunk.chunks(SUB).enumerate().find_map(|(k, sub)| {
                let any = sub.iter().fold(false, |a, e| a | (bits(e) & mask == mask));
                if !any {
                    return None;
                }
                sub.iter()
                    .position(|e| bits(e) & mask == mask)
                    .map(|j| c * BLOCK + k * SUB + j)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_minus_equals_decode_then_subtract() {
        // every 16-bit pattern (and as many f32 words), minus a base with signs, zeros and
        // large values
        let src: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        let n = src.len() / 2;
        let base: Vec<f32> = (0..n)
            .map(|j| ((j % 97) as f32 - 48.0) * 1.5e-3 * (1 << (j % 30)) as f32)
            .collect();
        for dt in [DType::BF16, DType::F16, DType::F32] {
            let m = src.len() / dt.size();
            let (mut want, mut got) = (vec![0f32; m], vec![0f32; m]);
            decode(dt, &src[..m * dt.size()], &mut want);
            want.iter_mut().zip(&base).for_each(|(w, b)| *w -= *b);
            decode_minus(dt, &src[..m * dt.size()], &base[..m], &mut got);
            for j in 0..m {
                assert_eq!(got[j].to_bits(), want[j].to_bits(), "{dt} element {j}");
            }
        }
    }

    #[test]
    fn f16_decode_matches_half_for_every_pattern() {
        for h in 0..=u16::MAX {
            let ours = f16_to_f32(h);
            let theirs = half::f16::from_bits(h).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn bf16_and_f16_encode_match_half() {
        // Every f16/bf16 value, the midpoints between neighbours (ties), and their neighbours.
        let mut probes: Vec<f32> = Vec::new();
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            probes.push(f);
            probes.push(bf16_to_f32(h));
            let b = f.to_bits();
            for d in [1u32, 0x0fff, 0x1000, 0x1001, 0x7fff, 0x8000, 0x8001] {
                probes.push(f32::from_bits(b.wrapping_add(d)));
                probes.push(f32::from_bits(b.wrapping_sub(d)));
            }
        }
        probes.extend([
            f32::MAX,
            f32::MIN_POSITIVE,
            65504.0,
            65519.99,
            65520.0,
            5.96e-8,
            2.98e-8,
        ]);
        for x in probes {
            let hb = half::bf16::from_f32(x).to_bits();
            let hf = half::f16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(bf16_to_f32(f32_to_bf16(x)).is_nan());
                assert!(f16_to_f32(f32_to_f16(x)).is_nan());
                continue;
            }
            assert_eq!(f32_to_bf16(x), hb, "bf16 of {x:e} ({:#010x})", x.to_bits());
            assert_eq!(f32_to_f16(x), hf, "f16 of {x:e} ({:#010x})", x.to_bits());
        }
    }

    #[test]
    fn roundtrip_through_bytes() {
        let v = [0.0f32, -0.0, 1.5, -2.25, 3.0e-5, 65504.0];
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let mut bytes = vec![0u8; v.len() * dt.size()];
            encode(dt, &v, &mut bytes);
            let mut back = vec![0f32; v.len()];
            decode(dt, &bytes, &mut back);
            let mut q = v;
            quantize(dt, &mut q);
            assert_eq!(back, q, "{dt}");
        }
    }
}

#[cfg(test)]
mod nonfinite_tests {
    use super::{first_nonfinite, DType};

    #[test]
    fn finds_the_first_nan_or_infinity_in_every_dtype() {
        let n = (1 << 16) * 2 + 300;
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let enc = |v: &[f32]| -> Vec<u8> {
                v.iter()
                    .flat_map(|x| match dt {
                        DType::F32 => x.to_le_bytes().to_vec(),
                        DType::BF16 => super::f32_to_bf16(*x).to_le_bytes().to_vec(),
                        _ => super::f32_to_f16(*x).to_le_bytes().to_vec(),
                    })
                    .collect()
            };
            // large finite values (f16's largest is 65504) are not hits
            let mut v: Vec<f32> = (0..n)
                .map(|i| if i % 3 == 0 { 65504.0 } else { -1.5 })
                .collect();
            assert_eq!(first_nonfinite(dt, &enc(&v)), None, "{dt}");
            for (first, second) in [(0, 5), (255, 256), ((1 << 16) - 1, 1 << 16), (n - 2, n - 1)] {
                v[second] = f32::INFINITY;
                v[first] = f32::NAN;
                let (i, x) = first_nonfinite(dt, &enc(&v)).unwrap();
                assert!(i == first && x.is_nan(), "{dt}: {i} {x}");
                v[first] = -1.5;
                let (i, x) = first_nonfinite(dt, &enc(&v)).unwrap();
                assert!(i == second && x == f32::INFINITY, "{dt}: {i} {x}");
                v[second] = -1.5;
            }
        }
    }
}
