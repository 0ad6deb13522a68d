//! The CPU backend: the reference for every test, and a fast engine of its own.
//!
//! Work is cut into fixed chunks of [`CHUNK`] elements, processed in parallel by rayon.
//! Each chunk's inputs are decoded into a per-thread f32 scratch that stays in cache while
//! every step of the method runs over it, so inputs are read from memory once per pass.
//! Chunk boundaries do not depend on the thread count, and partial sums are combined in
//! chunk order, so results are identical for any number of threads.

use rayon::prelude::*;

use super::{Backend, Consensus, GtaSpec, Input, Job, Keep, Query, RankCut, Source};
use crate::dtype::{self, DType};
use crate::error::Result;
use crate::rng::{to_uniform, Stream};

/// Elements per unit of work: 16 Ki f32 = 64 KiB per input, a few inputs fit in L2.
pub const CHUNK: usize = 16 * 1024;

#[derive(Default, Clone, Copy)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

/// Decodes elements `[start, start + dst.len())` of `input`, rounded to `load`.
#[inline]
pub fn load(input: &Input, start: usize, load: DType, dst: &mut [f32]) {
    let s = input.dtype.size();
    dtype::decode(
        input.dtype,
        &input.bytes[start * s..(start + dst.len()) * s],
        dst,
    );
    if load != DType::F32 && load != input.dtype {
        dtype::quantize(load, dst);
    }
}

/// Per-thread buffers for one chunk.
struct Scratch {
    base: Vec<f32>,
    x: Vec<Vec<f32>>,
    acc: Vec<f32>,
    acc2: Vec<f32>,
    acc3: Vec<f32>,
    bits: Vec<u32>,
}

impl Scratch {
    fn new(models: usize) -> Self {
        Scratch {
            base: vec![0.0; CHUNK],
            x: (0..models).map(|_| vec![0.0; CHUNK]).collect(),
            acc: vec![0.0; CHUNK],
            acc2: vec![0.0; CHUNK],
            acc3: vec![0.0; CHUNK],
            bits: Vec::with_capacity(CHUNK),
        }
    }
}

/// Writes `keep` as 0.0/1.0 factors into `m` for the chunk of deltas `d` that starts at
/// global element `start`.
fn keep_factors(keep: &Keep, stream: &Stream, start: usize, d: &[f32], m: &mut [f32]) {
    match *keep {
        Keep::All => m.fill(1.0),
        Keep::Nothing => m.fill(0.0),
        Keep::Ranks { lo, hi } => {
            for (j, (mv, dv)) in m.iter_mut().zip(d).enumerate() {
                let a = dv.abs().to_bits();
                let idx = (start + j) as u32;
                *mv = (hi.below(a, idx) && !lo.below(a, idx)) as u32 as f32;
            }
        }
        Keep::Random { p } => {
            // start is a multiple of 4 (CHUNK is), so blocks line up with chunks.
            for (bj, mb) in m.chunks_mut(4).enumerate() {
                let w = stream.block(((start / 4) + bj) as u64);
                for (l, mv) in mb.iter_mut().enumerate() {
                    *mv = (to_uniform(w[l]) < p) as u32 as f32;
                }
            }
        }
    }
}

/// Magnitude bits of a source for the first `len` elements of the loaded chunk.
fn source_bits(src: Source, s: &mut Scratch, len: usize) {
    s.bits.clear();
    match src {
        Source::Delta(i) => s.bits.extend(
            s.x[i][..len]
                .iter()
                .zip(&s.base[..len])
                .map(|(a, b)| (a - b).abs().to_bits()),
        ),
        Source::Model(i) => s
            .bits
            .extend(s.x[i][..len].iter().map(|a| a.abs().to_bits())),
    }
}

/// Loads the base and the models a set of sources needs, for one chunk.
fn load_chunk(
    job: &Job,
    start: usize,
    len: usize,
    need: &[bool],
    s: &mut Scratch,
    want_base: bool,
) {
    if want_base {
        if let Some(b) = &job.base {
            load(b, start, job.load_dtype, &mut s.base[..len]);
        }
    }
    for (i, m) in job.models.iter().enumerate() {
        if need[i] {
            load(m, start, job.load_dtype, &mut s.x[i][..len]);
        }
    }
}

fn chunks(n: usize) -> usize {
    n.div_ceil(CHUNK)
}

/// Histograms of the high or low 16 bits of each source's magnitudes. With `filter`, only
/// elements whose high 16 bits equal the given value are counted (second level).
fn histograms(job: &Job, sources: &[(Source, Option<u32>)]) -> Vec<Vec<u64>> {
    let n = job.numel;
    let need = need_models(job, sources.iter().map(|s| s.0));
    let want_base = sources.iter().any(|s| matches!(s.0, Source::Delta(_)));
    let nq = sources.len();
    (0..chunks(n))
        .into_par_iter()
        .fold(
            || {
                (
                    Scratch::new(job.models.len()),
                    vec![vec![0u64; 1 << 16]; nq],
                )
            },
            |(mut s, mut h), c| {
                let start = c * CHUNK;
                let len = CHUNK.min(n - start);
                load_chunk(job, start, len, &need, &mut s, want_base);
                for (q, (src, filter)) in sources.iter().enumerate() {
                    source_bits(*src, &mut s, len);
                    let (hq, bits) = (&mut h[q], &s.bits);
                    match filter {
                        None => bits.iter().for_each(|a| hq[(a >> 16) as usize] += 1),
                        Some(hi) => bits
                            .iter()
                            .filter(|a| *a >> 16 == *hi)
                            .for_each(|a| hq[(a & 0xffff) as usize] += 1),
                    }
                }
                (s, h)
            },
        )
        .map(|(_, h)| h)
        .reduce(
            || vec![vec![0u64; 1 << 16]; nq],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                }
                a
            },
        )
}

fn need_models(job: &Job, sources: impl Iterator<Item = Source>) -> Vec<bool> {
    let mut need = vec![false; job.models.len()];
    for s in sources {
        match s {
            Source::Delta(i) | Source::Model(i) => need[i] = true,
        }
    }
    need
}

/// Finds the bucket holding the element of descending rank `k - 1` in a histogram, given
/// `above` elements already known to rank higher. Returns (bucket, count strictly above it).
fn bucket_for(h: &[u64], k: u64, above: u64) -> (u32, u64) {
    let mut acc = above;
    for b in (0..h.len()).rev() {
        if acc + h[b] >= k {
            return (b as u32, acc);
        }
        acc += h[b];
    }
    unreachable!("rank {k} beyond the histogram's total {acc}")
}

/// Index of the `q`-th (0-based) element, in index order, whose magnitude bits equal `t`.
fn nth_equal(job: &Job, src: Source, t: u32, q: u64) -> u32 {
    let n = job.numel;
    let need = need_models(job, std::iter::once(src));
    let want_base = matches!(src, Source::Delta(_));
    // Count per chunk (parallel), then walk chunks in order to the one holding it.
    let counts: Vec<u64> = (0..chunks(n))
        .into_par_iter()
        .map_init(
            || Scratch::new(job.models.len()),
            |s, c| {
                let start = c * CHUNK;
                let len = CHUNK.min(n - start);
                load_chunk(job, start, len, &need, s, want_base);
                source_bits(src, s, len);
                s.bits.iter().filter(|&&a| a == t).count() as u64
            },
        )
        .collect();
    let mut before = 0u64;
    for (c, &cnt) in counts.iter().enumerate() {
        if before + cnt > q {
            let start = c * CHUNK;
            let len = CHUNK.min(n - start);
            let mut s = Scratch::new(job.models.len());
            load_chunk(job, start, len, &need, &mut s, want_base);
            source_bits(src, &mut s, len);
            let mut seen = before;
            for (j, &a) in s.bits.iter().enumerate() {
                if a == t {
                    if seen == q {
                        return (start + j) as u32;
                    }
                    seen += 1;
                }
            }
        }
        before += cnt;
    }
    unreachable!("fewer than {q} elements equal to the threshold")
}

impl Backend for Cpu {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn select(&self, job: &Job, queries: &[Query]) -> Result<Vec<RankCut>> {
        select_with(
            job,
            queries,
            |j, s| Ok(histograms(j, s)),
            |j, s, t, q| Ok(nth_equal(j, s, t, q)),
        )
    }

    fn masked_l1(&self, job: &Job, keep: &[Keep], seed: u64) -> Result<Vec<[f64; 2]>> {
        let n = job.numel;
        let m = job.models.len();
        let partials: Vec<Vec<[f64; 2]>> = (0..chunks(n))
            .into_par_iter()
            .map_init(
                || Scratch::new(m),
                |s, c| {
                    let start = c * CHUNK;
                    let len = CHUNK.min(n - start);
                    load_chunk(job, start, len, &vec![true; m], s, true);
                    let mut out = vec![[0.0f64; 2]; m];
                    for i in 0..m {
                        let (b, x) = (&s.base[..len], &mut s.x[i][..len]);
                        x.iter_mut().zip(b).for_each(|(x, b)| *x -= *b);
                        let stream = Stream::new(seed, job.name, i as u32);
                        keep_factors(&keep[i], &stream, start, x, &mut s.acc[..len]);
                        let (mut full, mut kept) = (0.0f64, 0.0f64);
                        for (d, k) in x.iter().zip(&s.acc[..len]) {
                            let a = d.abs() as f64;
                            full += a;
                            kept += a * *k as f64;
                        }
                        out[i] = [full, kept];
                    }
                    out
                },
            )
            .collect();
        let mut tot = vec![[0.0f64; 2]; m];
        for p in partials {
            for (t, v) in tot.iter_mut().zip(p) {
                t[0] += v[0];
                t[1] += v[1];
            }
        }
        Ok(tot)
    }

    fn gta(&self, job: &Job, spec: &GtaSpec, out: &mut [u8]) -> Result<()> {
        let m = job.models.len();
        let osz = job.out_dtype.size();
        let base = job.base.expect("gta needs a base");
        let streams: Vec<Stream> = (0..m)
            .map(|i| Stream::new(spec.seed, job.name, i as u32))
            .collect();
        let wsum: f32 = {
            let mut s = 0.0f32;
            spec.weights.iter().for_each(|w| s += *w);
            if s.abs() < 1e-8 {
                1.0
            } else {
                s
            }
        };
        out.par_chunks_mut(CHUNK * osz).enumerate().for_each_init(
            || Scratch::new(m),
            |s, (c, oc)| {
                let start = c * CHUNK;
                let len = oc.len() / osz;
                load(&base, start, job.load_dtype, &mut s.base[..len]);
                let b = &s.base[..len];
                for (i, (input, stream)) in job.models.iter().zip(&streams).enumerate() {
                    let x = &mut s.x[i][..len];
                    load(input, start, job.load_dtype, x);
                    x.iter_mut().zip(b).for_each(|(x, b)| *x -= *b);
                    let k = &mut s.acc[..len];
                    keep_factors(&spec.keep[i], stream, start, x, k);
                    let (sc, w) = (spec.scale[i], spec.weights[i]);
                    x.iter_mut()
                        .zip(k.iter())
                        .for_each(|(x, k)| *x = ((*x * *k) * sc) * w);
                }
                let mix = &mut s.acc[..len];
                let div = &mut s.acc2[..len];
                let maj = &mut s.acc3[..len];
                mix.fill(0.0);
                match spec.consensus {
                    Consensus::None => {
                        for i in 0..m {
                            mix.iter_mut()
                                .zip(&s.x[i][..len])
                                .for_each(|(a, x)| *a += *x);
                        }
                        div.fill(wsum);
                    }
                    Consensus::Sum | Consensus::Count => {
                        // mix holds the vote first, then the sum of agreeing deltas
                        for i in 0..m {
                            let x = &s.x[i][..len];
                            if spec.consensus == Consensus::Sum {
                                mix.iter_mut().zip(x).for_each(|(a, x)| *a += *x);
                            } else {
                                mix.iter_mut().zip(x).for_each(|(a, x)| *a += sign(*x));
                            }
                        }
                        maj.iter_mut()
                            .zip(mix.iter())
                            .for_each(|(s, v)| *s = if *v >= 0.0 { 1.0 } else { -1.0 });
                        mix.fill(0.0);
                        div.fill(0.0);
                        for i in 0..m {
                            let x = &s.x[i][..len];
                            let w = spec.weights[i];
                            for e in 0..len {
                                let agree = (sign(x[e]) == maj[e]) as u32 as f32;
                                mix[e] += x[e] * agree;
                                div[e] += w * agree;
                            }
                        }
                        div.iter_mut().for_each(|d| {
                            if *d == 0.0 {
                                *d = 1.0
                            }
                        });
                    }
                }
                let lambda = spec.lambda;
                for e in 0..len {
                    let mut v = mix[e];
                    if spec.normalize {
                        v /= div[e];
                    }
                    if lambda != 1.0 {
                        v *= lambda;
                    }
                    mix[e] = b[e] + v;
                }
                dtype::encode(job.out_dtype, mix, oc);
            },
        );
        Ok(())
    }

    fn convert(&self, job: &Job, out: &mut [u8]) -> Result<()> {
        let osz = job.out_dtype.size();
        out.par_chunks_mut(CHUNK * osz).enumerate().for_each_init(
            || vec![0f32; CHUNK],
            |tmp, (c, oc)| {
                let len = oc.len() / osz;
                load(&job.models[0], c * CHUNK, job.load_dtype, &mut tmp[..len]);
                dtype::encode(job.out_dtype, &tmp[..len], oc);
            },
        );
        Ok(())
    }

    fn weighted_sum(
        &self,
        job: &Job,
        weights: &[f32],
        divisor: Option<f32>,
        out: &mut [u8],
    ) -> Result<()> {
        let m = job.models.len();
        let osz = job.out_dtype.size();
        out.par_chunks_mut(CHUNK * osz).enumerate().for_each_init(
            || Scratch::new(m),
            |s, (c, oc)| {
                let start = c * CHUNK;
                let len = oc.len() / osz;
                let acc = &mut s.acc[..len];
                acc.fill(0.0);
                for (input, &w) in job.models.iter().zip(weights) {
                    let x = &mut s.x[0][..len];
                    load(input, start, job.load_dtype, x);
                    acc.iter_mut().zip(x.iter()).for_each(|(a, x)| *a += *x * w);
                }
                if let Some(d) = divisor {
                    acc.iter_mut().for_each(|a| *a /= d);
                }
                dtype::encode(job.out_dtype, acc, oc);
            },
        );
        Ok(())
    }
}

#[inline(always)]
pub fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The two-level radix selection shared by the backends: a histogram of the high 16 bits of
/// the magnitudes finds the bucket holding rank k; a histogram of the low 16 bits inside that
/// bucket finds the exact threshold; when the threshold value is tied and only some of the
/// tied elements fit, the index of the last one that fits is found in index order.
pub fn select_with(
    job: &Job,
    queries: &[Query],
    hist: impl Fn(&Job, &[(Source, Option<u32>)]) -> Result<Vec<Vec<u64>>>,
    nth_equal: impl Fn(&Job, Source, u32, u64) -> Result<u32>,
) -> Result<Vec<RankCut>> {
    let n = job.numel as u64;
    let mut out = vec![RankCut::NONE; queries.len()];
    // Level 1, one histogram per distinct source.
    let mut srcs: Vec<Source> = Vec::new();
    for q in queries {
        if q.k > 0 && q.k < n && !srcs.contains(&q.source) {
            srcs.push(q.source);
        }
    }
    if srcs.is_empty() {
        for (o, q) in out.iter_mut().zip(queries) {
            *o = if q.k == 0 {
                RankCut::NONE
            } else {
                RankCut::ALL
            };
        }
        return Ok(out);
    }
    let h1 = hist(job, &srcs.iter().map(|s| (*s, None)).collect::<Vec<_>>())?;
    // Level 2 for each distinct (source, high bucket).
    let mut level2: Vec<(Source, u32)> = Vec::new();
    let mut first: Vec<Option<(usize, u32, u64)>> = Vec::new();
    for q in queries {
        if q.k == 0 || q.k >= n {
            first.push(None);
            continue;
        }
        let si = srcs.iter().position(|s| *s == q.source).unwrap();
        let (hb, above) = bucket_for(&h1[si], q.k, 0);
        if !level2.contains(&(q.source, hb)) {
            level2.push((q.source, hb));
        }
        first.push(Some((si, hb, above)));
    }
    let h2 = hist(
        job,
        &level2
            .iter()
            .map(|(s, hb)| (*s, Some(*hb)))
            .collect::<Vec<_>>(),
    )?;
    for (qi, q) in queries.iter().enumerate() {
        let Some((_, hb, above)) = first[qi] else {
            out[qi] = if q.k == 0 {
                RankCut::NONE
            } else {
                RankCut::ALL
            };
            continue;
        };
        let li = level2.iter().position(|x| *x == (q.source, hb)).unwrap();
        let (lb, c_gt) = bucket_for(&h2[li], q.k, above);
        let t = (hb << 16) | lb;
        let eq = h2[li][lb as usize];
        let quota = q.k - c_gt;
        out[qi] = if quota == eq {
            RankCut {
                bits: t,
                index: u32::MAX,
            }
        } else {
            RankCut {
                bits: t,
                index: nth_equal(job, q.source, t, quota - 1)? + 1,
            }
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_input(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn select_with_ties_keeps_lower_indices() {
        // magnitudes: 3 1 2 2 2 0.5 2  (indices 0..7)
        let v = [3.0f32, -1.0, 2.0, -2.0, 2.0, 0.5, 2.0];
        let bytes = f32_input(&v);
        let job = Job::new(
            "t",
            None,
            vec![Input {
                bytes: &bytes,
                dtype: DType::F32,
            }],
            DType::F32,
            DType::F32,
        );
        let q = |k| Query {
            source: Source::Model(0),
            k,
        };
        let cuts = Cpu
            .select(&job, &[q(0), q(1), q(3), q(5), q(7), q(100)])
            .unwrap();
        let kept = |c: RankCut| -> Vec<usize> {
            (0..v.len())
                .filter(|&i| c.below(v[i].abs().to_bits(), i as u32))
                .collect()
        };
        assert_eq!(kept(cuts[0]), Vec::<usize>::new());
        assert_eq!(kept(cuts[1]), vec![0]);
        assert_eq!(kept(cuts[2]), vec![0, 2, 3]); // the first two of the four 2s
        assert_eq!(kept(cuts[3]), vec![0, 2, 3, 4, 6]); // all four 2s exactly
        assert_eq!(kept(cuts[4]), (0..7).collect::<Vec<_>>());
        assert_eq!(kept(cuts[5]), (0..7).collect::<Vec<_>>());
    }
}
