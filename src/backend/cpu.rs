//! The CPU backend: the reference for every test, and a fast engine of its own.
//!
//! Work is cut into fixed chunks of [`CHUNK`] elements, processed in parallel by rayon.
//! Each chunk's inputs are decoded into a per-thread f32 scratch that stays in cache while
//! every step of the method runs over it, so inputs are read from memory once per pass.
//! Chunk boundaries do not depend on the thread count, and partial sums are combined in
//! chunk order, so results are identical for any number of threads.

// The kernels walk several parallel arrays (models, votes, keys) by the same index; the
// indexed loops read like the math they implement.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use super::{
    pcb_tanh, Backend, Consensus, Fused, GtaSpec, Input, Job, Keep, Key, PcbSpec, Query, RankCut,
    RowLayout, Segments, Source, Sparsity, Vector, Vote,
};
use crate::dtype::{self, DType};
use crate::error::Result;
use crate::linalg::{Mat, Svd};
use crate::rng::Stream;

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

/// Whether `out` can be written as f32 values: the output dtype is f32 and the bytes are
/// aligned for it (mapped and heap outputs are). Kernels then write their results in place
/// instead of encoding a copy.
fn f32_in_place(dtype: DType, out: &[u8]) -> bool {
    dtype == DType::F32
        && cfg!(target_endian = "little")
        && out.as_ptr().align_offset(4) == 0
        && out.len().is_multiple_of(4)
}

/// Whether any value is NaN or infinite (exponent all ones); branch-free, so it vectorises.
fn any_nonfinite(v: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    let (blocks, rest) = v.as_chunks::<64>();
    blocks
        .iter()
        .any(|b| b.iter().fold(false, |a, x| a | (x.to_bits() & EXP == EXP)))
        || rest.iter().any(|x| x.to_bits() & EXP == EXP)
}

/// What the chunks of one `gta` or `weighted_sum` call report: the first error of
/// [`Job::sink`], and whether an input or output value was NaN or infinite (looked for only
/// when the job has a [`super::FiniteScan`]).
#[derive(Default)]
struct ChunkChecks {
    failed: std::sync::Mutex<Option<crate::error::Error>>,
    inputs_nonfinite: AtomicBool,
    output_nonfinite: AtomicBool,
}

impl ChunkChecks {
    /// Looks at decoded input values (or deltas) of a chunk.
    fn inputs(&self, job: &Job, vals: &[f32]) {
        if job.scan.is_some() && any_nonfinite(vals) {
            self.inputs_nonfinite.store(true, Relaxed);
        }
    }

    /// Looks at a chunk's output values.
    fn output(&self, job: &Job, vals: &[f32]) {
        if job.scan.is_some() && any_nonfinite(vals) {
            self.output_nonfinite.store(true, Relaxed);
        }
    }

    /// The call's result: the first sink error, else Ok with the findings recorded in the
    /// job's scan: the inputs when `inputs_covered` (every input element was looked at), the
    /// output when it is f32 (narrower values can still overflow as they are encoded).
    fn finish(self, job: &Job, inputs_covered: bool) -> Result<()> {
        if let Some(e) = self.failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        if let Some(scan) = job.scan {
            if inputs_covered {
                scan.record_inputs(self.inputs_nonfinite.into_inner());
            }
            if job.out_dtype == DType::F32 {
                scan.record_output(self.output_nonfinite.into_inner());
            }
        }
        Ok(())
    }
}

/// Puts chunk `c`'s values into the output: through [`Job::sink`] when the job has one (from
/// this cache-hot chunk, with `obytes` for the encoding), else encoded into `oc`, the chunk's
/// part of `out`. The first sink error lands in `checks`.
fn emit(
    job: &Job,
    c: usize,
    vals: &[f32],
    oc: &mut [u8],
    obytes: &mut Vec<u8>,
    checks: &ChunkChecks,
) {
    let Some(sink) = job.sink else {
        dtype::encode(job.out_dtype, vals, oc);
        return;
    };
    let at = (c * CHUNK * job.out_dtype.size()) as u64;
    let r = if job.out_dtype == DType::F32 && cfg!(target_endian = "little") {
        sink(at, bytemuck::cast_slice(vals))
    } else {
        obytes.resize(oc.len(), 0);
        dtype::encode(job.out_dtype, vals, obytes);
        sink(at, obytes)
    };
    if let Err(e) = r {
        checks
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
    }
}

/// Per-thread buffers for one chunk.
struct Scratch {
    base: Vec<f32>,
    x: Vec<Vec<f32>>,
    /// Per model, the chunk's keep bits (bit j of word j / 64 for element j).
    kb: Vec<Vec<u64>>,
    /// Model buffers not in use by the current job (x holds exactly `models`).
    spare: Vec<Vec<f32>>,
    acc: Vec<f32>,
    acc2: Vec<f32>,
    var: Vec<f32>,
    bits: Vec<u32>,
    /// A chunk's output bytes on their way to [`Job::sink`].
    obytes: Vec<u8>,
}

thread_local! {
    /// Scratches of finished work on this thread, reused: a fresh one is 8+ buffers of
    /// 64 KiB to allocate, page-fault and zero, and rayon asks for one per split.
    static POOL: std::cell::RefCell<Vec<Scratch>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A [`Scratch`] taken from this thread's pool; goes back to it when dropped.
struct Pooled(Option<Scratch>);

impl std::ops::Deref for Pooled {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        self.0.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Scratch {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            // during thread teardown the pool may be gone: then the scratch is just freed
            let _ = POOL.try_with(|p| p.borrow_mut().push(s));
        }
    }
}

fn buf() -> Vec<f32> {
    vec![0.0; CHUNK]
}

impl Scratch {
    /// A scratch for `models` models: reused from this thread's pool when there is one.
    /// Its buffers hold whatever the last user left; every kernel writes before it reads.
    fn take(models: usize) -> Pooled {
        let mut s = POOL
            .try_with(|p| p.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| Scratch {
                base: buf(),
                x: Vec::new(),
                kb: Vec::new(),
                spare: Vec::new(),
                acc: buf(),
                acc2: buf(),
                var: buf(),
                bits: Vec::with_capacity(CHUNK),
                obytes: Vec::new(),
            });
        while s.x.len() > models {
            let b = s.x.pop().unwrap();
            s.spare.push(b);
        }
        while s.x.len() < models {
            let b = s.spare.pop().unwrap_or_else(buf);
            s.x.push(b);
        }
        s.kb.resize_with(models, || Vec::with_capacity(CHUNK / 64));
        Pooled(Some(s))
    }

    /// Loads the base and every model, and turns the models into deltas when `deltas`.
    fn load_all(&mut self, job: &Job, start: usize, len: usize, deltas: bool) {
        if let Some(b) = &job.base {
            load(b, start, job.load_dtype, &mut self.base[..len]);
        }
        for (i, m) in job.models.iter().enumerate() {
            let x = &mut self.x[i][..len];
            let exact = job.load_dtype == DType::F32 || job.load_dtype == m.dtype;
            if deltas && exact {
                // decoded and turned into a delta in one pass
                let sz = m.dtype.size();
                let bytes = &m.bytes[start * sz..(start + len) * sz];
                dtype::decode_minus(m.dtype, bytes, &self.base[..len], x);
                continue;
            }
            load(m, start, job.load_dtype, x);
            if deltas {
                x.iter_mut()
                    .zip(&self.base[..len])
                    .for_each(|(x, b)| *x -= *b);
            }
        }
    }
}

/// Σ_i (d_i - m)² with m = (Σ_i d_i)·(1/M), for deltas already in `x`.
fn variance_keys(x: &[Vec<f32>], len: usize, out: &mut [f32]) {
    let inv = 1.0 / x.len() as f32;
    let out = &mut out[..len];
    out.fill(0.0);
    for xi in x {
        out.iter_mut().zip(&xi[..len]).for_each(|(o, d)| *o += *d);
    }
    out.iter_mut().for_each(|o| *o *= inv);
    let mut acc = vec![0.0f32; len];
    for xi in x {
        acc.iter_mut()
            .zip(&xi[..len])
            .zip(out.iter())
            .for_each(|((a, d), m)| {
                let e = *d - *m;
                *a += e * e;
            });
    }
    out.copy_from_slice(&acc);
}

/// What a keep rule needs besides the deltas of the chunk.
struct KeepCtx<'a> {
    stream: Stream,
    /// Variance keys of the chunk (when a rule ranks by them).
    var: &'a [f32],
    /// Per-element DELLA rank of this model (whole tensor) and its threshold table.
    ranks: Option<&'a [u32]>,
    table: Option<&'a [u32]>,
}

/// Writes `keep` as bits into `out` for the chunk of deltas `d` that starts at global element
/// `start`: bit j of word j / 64 for element `start + j`, `d.len().div_ceil(64)` words, the
/// bits past the chunk's end clear.
fn keep_bits(keep: &Keep, cx: &KeepCtx, start: usize, d: &[f32], out: &mut Vec<u64>) {
    let len = d.len();
    out.clear();
    match *keep {
        Keep::All => out.resize(len.div_ceil(64), u64::MAX),
        Keep::Nothing => out.resize(len.div_ceil(64), 0),
        Keep::Ranks { lo, hi, key } => {
            let keys = match key {
                Key::Delta => d,
                Key::Variance => &cx.var[..len],
            };
            // whole words through a fixed-length loop (vector compares into a mask)
            let kept = |j: usize, k: f32| {
                let (a, idx) = (k.abs().to_bits(), (start + j) as u32);
                (hi.below(a, idx) & !lo.below(a, idx)) as u64
            };
            let (words, rest) = keys.as_chunks::<64>();
            out.extend(words.iter().enumerate().map(|(w, c)| {
                let mut bits = 0u64;
                for (j, k) in c.iter().enumerate() {
                    bits |= kept(64 * w + j, *k) << j;
                }
                bits
            }));
            if !rest.is_empty() {
                let at = 64 * words.len();
                out.push(
                    rest.iter()
                        .enumerate()
                        .fold(0, |bits, (j, k)| bits | kept(at + j, *k) << j),
                );
            }
        }
        Keep::Random { p } => {
            // start is a multiple of 64 (CHUNK is): word w is blocks start/4 + 16w ..
            let t = super::keep_threshold(p);
            let words = len.div_ceil(64);
            // four words per call: their Philox rounds overlap
            for w in (0..words).step_by(4) {
                let four = cx.stream.keep_words((start / 4 + 16 * w) as u64, t);
                out.extend_from_slice(&four[..(words - w).min(4)]);
            }
        }
        Keep::Della { .. } => {
            let (ranks, table) = (
                cx.ranks.expect("della ranks"),
                cx.table.expect("della table"),
            );
            out.extend((0..len.div_ceil(64)).map(|w| {
                let at = start + 64 * w;
                let t = |e: usize| ranks.get(at + e).map_or(0, |r| table[*r as usize]);
                cx.stream.keep_word_by((at / 4) as u64, t)
            }));
        }
    }
    if !len.is_multiple_of(64) {
        if let Some(last) = out.last_mut() {
            *last &= (1u64 << (len % 64)) - 1;
        }
    }
}

/// The keep factors (0.0 or 1.0) of the low N bits of a word of keep bits.
#[inline(always)]
fn factors<const N: usize>(w: u64) -> [f32; N] {
    std::array::from_fn(|j| ((w >> j) & 1) as u32 as f32)
}

/// Adds |d|, |d|·k and (d·k)² of elements 8j + l into lane l of the three sums, in element
/// order (whole groups of eight, then the remainder into lanes 0..), where k is the element's
/// keep bit as 0.0 or 1.0, and returns each sum's lanes added up. The lanes make the sums
/// independent of the thread count and let them run on f64 vectors.
fn masked_lanes<const SQ: bool>(d: &[f32], bits: &[u64]) -> [f64; 3] {
    let mut t = [[0.0f64; 8]; 3];
    // 512 elements at a time: their factors unpacked on the stack, then the lanes
    const SPAN: usize = 512;
    let mut k = [0.0f32; SPAN];
    for (c, dc) in d.chunks(SPAN).enumerate() {
        for (w, kw) in k.as_chunks_mut::<64>().0.iter_mut().enumerate() {
            *kw = factors(bits.get(c * SPAN / 64 + w).copied().unwrap_or(0));
        }
        let (dg, dr) = dc.as_chunks::<8>();
        let (kg, kr) = k[..dc.len()].as_chunks::<8>();
        lane_sums8::<SQ>(&mut t, dg, kg);
        for l in 0..dr.len() {
            lane_step::<SQ>(&mut t, l, dr[l], kr[l]);
        }
    }
    t.map(|lanes| lanes.iter().sum())
}

/// One element's |d|, |d|·k and (when SQ) (d·k)² added into lane `l` of the three sums.
#[inline(always)]
fn lane_step<const SQ: bool>(t: &mut [[f64; 8]; 3], l: usize, d: f32, k: f32) {
    let a = d.abs() as f64;
    t[0][l] += a;
    t[1][l] += a * k as f64;
    if SQ {
        let kd = (d * k) as f64;
        t[2][l] += kd * kd;
    }
}

/// The lanes of [`masked_lanes`], continued over whole groups of eight. LLVM keeps these f64
/// lanes in two-wide registers, so x86-64 with AVX has them written out: the same operations
/// in the same order (f32 products widened, separate multiply and add), hence the same bits.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
fn lane_sums8<const SQ: bool>(lanes: &mut [[f64; 8]; 3], dc: &[[f32; 8]], kc: &[[f32; 8]]) {
    use std::arch::x86_64::*;
    // SAFETY: AVX is enabled for this build (the cfg above); loads and stores are unaligned
    // ones of whole arrays.
    unsafe {
        let mut t = lanes.map(|l| {
            [
                _mm256_loadu_pd(l.as_ptr()),
                _mm256_loadu_pd(l.as_ptr().add(4)),
            ]
        });
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (d, k) in dc.iter().zip(kc) {
            let dv = _mm256_loadu_ps(d.as_ptr());
            let kv = _mm256_loadu_ps(k.as_ptr());
            let av = _mm256_and_ps(dv, abs);
            let halves = |v: __m256| {
                [
                    _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                    _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
                ]
            };
            let (a, kf) = (halves(av), halves(kv));
            for h in 0..2 {
                t[0][h] = _mm256_add_pd(t[0][h], a[h]);
                t[1][h] = _mm256_add_pd(t[1][h], _mm256_mul_pd(a[h], kf[h]));
            }
            if SQ {
                let kd = halves(_mm256_mul_ps(dv, kv));
                for h in 0..2 {
                    t[2][h] = _mm256_add_pd(t[2][h], _mm256_mul_pd(kd[h], kd[h]));
                }
            }
        }
        for (o, v) in lanes.iter_mut().zip(&t) {
            _mm256_storeu_pd(o.as_mut_ptr(), v[0]);
            _mm256_storeu_pd(o.as_mut_ptr().add(4), v[1]);
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
fn lane_sums8<const SQ: bool>(t: &mut [[f64; 8]; 3], dc: &[[f32; 8]], kc: &[[f32; 8]]) {
    for (d, k) in dc.iter().zip(kc) {
        for l in 0..8 {
            lane_step::<SQ>(t, l, d[l], k[l]);
        }
    }
}

/// Ascending rank of each element's |delta| within its row (ties: lower index first).
pub fn row_ranks(job: &Job, model: usize, rows: RowLayout) -> Vec<u32> {
    let mut ranks = vec![0u32; job.numel];
    let slab = rows.slab().max(1);
    let base = job.base.as_ref().expect("row ranks need a base");
    let x = &job.models[model];
    ranks.par_chunks_mut(slab).enumerate().for_each(|(o, out)| {
        let start = o * slab;
        let mut b = vec![0f32; slab];
        let mut v = vec![0f32; slab];
        load(base, start, job.load_dtype, &mut b);
        load(x, start, job.load_dtype, &mut v);
        // (key, position) packed into one u64: sorting integers beats sorting pairs
        let mut keys: Vec<u64> = Vec::with_capacity(rows.len);
        let mut tmp: Vec<u64> = Vec::with_capacity(rows.len);
        for i in 0..rows.inner {
            keys.clear();
            keys.extend((0..rows.len).map(|j| {
                let e = j * rows.inner + i;
                ((v[e] - b[e]).abs().to_bits() as u64) << 32 | j as u64
            }));
            radix_sort_keys(&mut keys, &mut tmp);
            for (pos, &k) in keys.iter().enumerate() {
                out[(k as u32) as usize * rows.inner + i] = pos as u32;
            }
        }
    });
    ranks
}

/// Sorts (key << 32 | position) values by key, stably, so equal keys stay in position order
/// (which is the order they were pushed in): LSD radix on the key's 32 bits, 11 + 11 + 10.
fn radix_sort_keys(v: &mut Vec<u64>, tmp: &mut Vec<u64>) {
    if v.len() <= 64 {
        v.sort_unstable();
        return;
    }
    tmp.clear();
    tmp.resize(v.len(), 0);
    for (shift, bits) in [(32u32, 11u32), (43, 11), (54, 10)] {
        let mask = (1u64 << bits) - 1;
        let mut count = [0usize; 2048];
        for &x in v.iter() {
            count[((x >> shift) & mask) as usize] += 1;
        }
        let mut sum = 0;
        for c in count.iter_mut() {
            let t = *c;
            *c = sum;
            sum += t;
        }
        for &x in v.iter() {
            let d = ((x >> shift) & mask) as usize;
            tmp[count[d]] = x;
            count[d] += 1;
        }
        std::mem::swap(v, tmp);
    }
}

/// Rank arrays of every DELLA model of a sparsity (None for the others).
fn della_ranks(job: &Job, sp: &Sparsity) -> Vec<Option<Vec<u32>>> {
    sp.keep
        .iter()
        .enumerate()
        .map(|(i, k)| match k {
            Keep::Della { rows, .. } => Some(row_ranks(job, i, *rows)),
            _ => None,
        })
        .collect()
}

/// Key bits of a source for the first `len` elements of the loaded chunk.
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
        Source::Variance => {
            let mut d: Vec<Vec<f32>> = s.x.iter().map(|x| x[..len].to_vec()).collect();
            for di in d.iter_mut() {
                di.iter_mut()
                    .zip(&s.base[..len])
                    .for_each(|(x, b)| *x -= *b);
            }
            variance_keys(&d, len, &mut s.var);
            s.bits
                .extend(s.var[..len].iter().map(|v| v.abs().to_bits()));
        }
    }
}

fn chunks(n: usize) -> usize {
    n.div_ceil(CHUNK)
}

fn chunk_range(n: usize, c: usize) -> (usize, usize) {
    let start = c * CHUNK;
    (start, CHUNK.min(n - start))
}

/// Sample size of [`bracket_select`] (at most; n/64 for smaller tensors, at least
/// MIN_SAMPLE), taken in runs of contiguous elements.
const SAMPLE: usize = 1 << 16;
const MIN_SAMPLE: usize = 1 << 13;
const SAMPLE_RUN: usize = 16;
/// Below this many elements a sample would be much of the tensor: the bracket is then the
/// whole range (every element a candidate), still one pass.
const SMALL: usize = 4 * SAMPLE;

/// Exact rank selection in one pass over the data: a deterministic sample
/// of the keys brackets each wanted threshold; one pass counts the keys above each bracket
/// and collects those inside it; the answer is found among the collected few percent. When a
/// bracket misses (the sample was unlucky), returns None and the caller runs the two-pass
/// histogram selection instead. Either way the answer is the same exact cut.
fn bracket_select(job: &Job, queries: &[Query]) -> Option<Vec<RankCut>> {
    let n = job.numel;
    let m = job.models.len();
    let mut srcs: Vec<Source> = Vec::new();
    for q in queries {
        if !srcs.contains(&q.source) {
            srcs.push(q.source);
        }
    }
    let brackets: Vec<(usize, u32, u32)> = if n < SMALL {
        // the whole range: every element is a candidate
        queries
            .iter()
            .map(|q| {
                (
                    srcs.iter().position(|s| *s == q.source).unwrap(),
                    0,
                    u32::MAX,
                )
            })
            .collect()
    } else {
        // ns keys per source from evenly spaced runs of SAMPLE_RUN contiguous elements:
        // runs cost one decode each instead of a cache miss per key, and enough runs spread
        // over the tensor to follow how magnitudes vary across rows
        let ns = (n / 64).clamp(MIN_SAMPLE, SAMPLE) / SAMPLE_RUN * SAMPLE_RUN;
        let runs = ns / SAMPLE_RUN;
        let stride = n / runs;
        let mut samples: Vec<Vec<u32>> = vec![Vec::with_capacity(ns); srcs.len()];
        let mut s = Scratch::take(m);
        for r in 0..runs {
            s.load_all(job, r * stride, SAMPLE_RUN, false);
            for (si, &src) in srcs.iter().enumerate() {
                source_bits(src, &mut s, SAMPLE_RUN);
                samples[si].extend_from_slice(&s.bits);
            }
        }
        // bracket [lo, hi] of key bits per query: two order statistics of the sample
        // (selected, not sorted: a sort of the sample costs more than the pass)
        queries
            .iter()
            .map(|q| {
                let si = srcs.iter().position(|s| *s == q.source).unwrap();
                let keys = &mut samples[si];
                // the j-th largest sampled key
                let mut nth = |j: usize| *keys.select_nth_unstable_by(j, |a, b| b.cmp(a)).1;
                let r = q.k as f64 / n as f64;
                let margin = (5.0 * (r * (1.0 - r) * ns as f64).sqrt()) as usize + 32;
                let at = (r * ns as f64) as usize;
                let hi = if at < margin {
                    u32::MAX
                } else {
                    nth((at - margin).min(ns - 1))
                };
                let lo = if at + margin >= ns {
                    0
                } else {
                    nth(at + margin)
                };
                (si, lo, hi)
            })
            .collect()
    };
    // one pass: per chunk, the count above each bracket and the candidates inside it, as
    // (key descending, index ascending) in one u64 with the key complemented: the order that
    // defines ranks is then plain ascending order
    type Found = (Vec<u64>, Vec<Vec<u64>>);
    let per_chunk: Vec<Found> = (0..chunks(n))
        .into_par_iter()
        .map_init(
            || Scratch::take(m),
            |s, c| {
                let s: &mut Scratch = s;
                let (start, len) = chunk_range(n, c);
                s.load_all(job, start, len, false);
                let mut above = vec![0u64; queries.len()];
                let mut inside = vec![Vec::new(); queries.len()];
                for (si, src) in srcs.iter().enumerate() {
                    source_bits(*src, s, len);
                    for (qi, &(qs, lo, hi)) in brackets.iter().enumerate() {
                        if qs != si {
                            continue;
                        }
                        // a vectorised count; then per 64 keys a bit mask of those inside
                        // (compares without branches), whose set bits are collected
                        let bits = &s.bits[..len];
                        above[qi] = bits.iter().map(|&a| (a > hi) as u32).sum::<u32>() as u64;
                        let span = hi.wrapping_sub(lo);
                        let found = &mut inside[qi];
                        // whole blocks through a fixed-length loop (a vector compare
                        // into a mask), then the rest
                        let (blocks, rest) = bits.as_chunks::<64>();
                        let masks = blocks
                            .iter()
                            .map(|blk| {
                                let mut mask = 0u64;
                                for l in 0..64 {
                                    mask |= ((blk[l].wrapping_sub(lo) <= span) as u64) << l;
                                }
                                mask
                            })
                            .chain((!rest.is_empty()).then(|| {
                                rest.iter().enumerate().fold(0u64, |mask, (l, &a)| {
                                    mask | ((a.wrapping_sub(lo) <= span) as u64) << l
                                })
                            }));
                        for (w, mut mask) in masks.enumerate() {
                            while mask != 0 {
                                let j = w * 64 + mask.trailing_zeros() as usize;
                                mask &= mask - 1;
                                found.push(((!bits[j] as u64) << 32) | (start + j) as u64);
                            }
                        }
                    }
                }
                (above, inside)
            },
        )
        .collect();
    // each query's cut from its candidates, the queries in parallel
    let cut = |(qi, q): (usize, &Query)| -> Option<RankCut> {
        let above: u64 = per_chunk.iter().map(|c| c.0[qi]).sum();
        // (key descending, index ascending) is the order that defines ranks: as one u64 with
        // the key complemented it is plain ascending order
        let mut cand: Vec<u64> = Vec::with_capacity(per_chunk.iter().map(|c| c.1[qi].len()).sum());
        per_chunk
            .iter()
            .for_each(|c| cand.extend_from_slice(&c.1[qi]));
        if q.k <= above || q.k > above + cand.len() as u64 {
            return None;
        }
        let want = (q.k - above - 1) as usize;
        let (_, &mut kth, _) = cand.select_nth_unstable(want);
        // kth is the element of rank k - 1: key t at index i. The cut keeps every key above
        // t and the keys equal to t up to index i; when i is the last index holding t, all
        // of them (index u32::MAX). Equal keys all lie inside the bracket.
        let (key, i) = (kth >> 32, kth as u32);
        let more = cand.iter().fold(false, |acc, &c| {
            acc | (((c >> 32) == key) & ((c as u32) > i))
        });
        Some(RankCut {
            bits: !(key as u32),
            index: if more { i + 1 } else { u32::MAX },
        })
    };
    queries.par_iter().enumerate().map(cut).collect()
}

impl Backend for Cpu {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn select(&self, job: &Job, queries: &[Query]) -> Result<Vec<RankCut>> {
        let n = job.numel as u64;
        let hard: Vec<Query> = queries
            .iter()
            .copied()
            .filter(|q| q.k > 0 && q.k < n)
            .collect();
        if !hard.is_empty() {
            if let Some(cuts) = bracket_select(job, &hard) {
                let mut it = cuts.into_iter();
                return Ok(queries
                    .iter()
                    .map(|q| match q.k {
                        0 => RankCut::NONE,
                        k if k >= n => RankCut::ALL,
                        _ => it.next().unwrap(),
                    })
                    .collect());
            }
            log::debug!(
                "{}: the sampled brackets missed; selecting in two passes",
                job.name
            );
        }
        super::select::select_with(
            job,
            queries,
            |j, s| self.histogram(j, s),
            |j, s, t, q| self.nth_equal(j, s, t, q),
        )
    }

    fn histogram(&self, job: &Job, sources: &[(Source, Option<u32>)]) -> Result<Vec<Vec<u64>>> {
        let n = job.numel;
        let nq = sources.len();
        // a few splits per thread: each costs a 512 KiB histogram per source to zero and
        // to add up (counts: the sum is the same however the chunks are split)
        let nc = chunks(n);
        let min = nc.div_ceil(4 * rayon::current_num_threads()).max(1);
        let h = (0..nc)
            .into_par_iter()
            .with_min_len(min)
            .fold(
                || {
                    (
                        Scratch::take(job.models.len()),
                        vec![vec![0u64; 1 << 16]; nq],
                    )
                },
                |(mut s, mut h), c| {
                    let (start, len) = chunk_range(n, c);
                    s.load_all(job, start, len, false);
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
            );
        Ok(h)
    }

    fn nth_equal(&self, job: &Job, src: Source, t: u32, q: u64) -> Result<u32> {
        let n = job.numel;
        // Count per chunk (parallel), then walk chunks in order to the one holding it.
        let counts: Vec<u64> = (0..chunks(n))
            .into_par_iter()
            .map_init(
                || Scratch::take(job.models.len()),
                |s, c| {
                    let s: &mut Scratch = s;
                    let (start, len) = chunk_range(n, c);
                    s.load_all(job, start, len, false);
                    source_bits(src, s, len);
                    s.bits.iter().filter(|&&a| a == t).count() as u64
                },
            )
            .collect();
        let mut before = 0u64;
        for (c, &cnt) in counts.iter().enumerate() {
            if before + cnt > q {
                let (start, len) = chunk_range(n, c);
                let mut s = Scratch::take(job.models.len());
                s.load_all(job, start, len, false);
                source_bits(src, &mut s, len);
                let j = s
                    .bits
                    .iter()
                    .enumerate()
                    .filter(|(_, &a)| a == t)
                    .nth((q - before) as usize)
                    .map(|(j, _)| j)
                    .expect("counted above");
                return Ok((start + j) as u32);
            }
            before += cnt;
        }
        unreachable!("fewer than {q} elements equal to the threshold")
    }

    fn scans_inputs(&self) -> bool {
        true
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
        let checks = ChunkChecks::default();
        out.par_chunks_mut(CHUNK * osz).enumerate().for_each_init(
            || Scratch::take(m),
            |s, (c, oc)| {
                let s: &mut Scratch = s;
                let start = c * CHUNK;
                let len = oc.len() / osz;
                let acc = &mut s.acc[..len];
                acc.fill(0.0);
                for (input, &w) in job.models.iter().zip(weights) {
                    let x = &mut s.x[0][..len];
                    load(input, start, job.load_dtype, x);
                    checks.inputs(job, x);
                    acc.iter_mut().zip(x.iter()).for_each(|(a, x)| *a += *x * w);
                }
                if let Some(d) = divisor {
                    acc.iter_mut().for_each(|a| *a /= d);
                }
                checks.output(job, acc);
                emit(job, c, acc, oc, &mut s.obytes, &checks);
            },
        );
        // every model is decoded; a base is not read at all
        checks.finish(job, job.base.is_none())
    }

    fn dots(
        &self,
        job: &Job,
        vecs: &[Vector],
        pairs: &[(usize, usize)],
        seg: Segments,
    ) -> Result<Vec<f64>> {
        let n = job.numel;
        let np = pairs.len();
        let nseg = seg.count(n);
        let m = job.models.len();
        // Per chunk: the partial sums of every segment it touches, combined in chunk order.
        let partials: Vec<(usize, Vec<f64>)> = (0..chunks(n))
            .into_par_iter()
            .map_init(
                || (Scratch::take(m), vec![Vec::new(); vecs.len()]),
                |(s, vals), c| {
                    let (start, len) = chunk_range(n, c);
                    s.load_all(job, start, len, false);
                    for (v, out) in vecs.iter().zip(vals.iter_mut()) {
                        vector_values(*v, s, len, out);
                    }
                    let (first, last) = match seg {
                        Segments::Whole => (0, 0),
                        Segments::Rows { len: l } => (start / l, (start + len - 1) / l),
                        Segments::Cols { .. } => (0, nseg - 1),
                    };
                    let mut acc = vec![0.0f64; (last - first + 1) * np];
                    match seg {
                        Segments::Cols { .. } => {
                            for e in 0..len {
                                let sg = seg.of(start + e) - first;
                                for (p, &(a, b)) in pairs.iter().enumerate() {
                                    acc[sg * np + p] += vals[a][e] as f64 * vals[b][e] as f64;
                                }
                            }
                        }
                        _ => {
                            // runs of one segment, each summed in eight f64 lanes
                            let mut e = 0;
                            while e < len {
                                let sg = seg.of(start + e);
                                let end = match seg {
                                    Segments::Rows { len: l } => ((sg + 1) * l - start).min(len),
                                    _ => len,
                                };
                                for (p, &(a, b)) in pairs.iter().enumerate() {
                                    let mut lanes = [0.0f64; 8];
                                    let (va, vb) = (&vals[a][e..end], &vals[b][e..end]);
                                    for (x, y) in va.chunks(8).zip(vb.chunks(8)) {
                                        for l in 0..x.len() {
                                            lanes[l] += x[l] as f64 * y[l] as f64;
                                        }
                                    }
                                    acc[(sg - first) * np + p] += lanes.iter().sum::<f64>();
                                }
                                e = end;
                            }
                        }
                    }
                    (first, acc)
                },
            )
            .collect();
        let mut out = vec![0.0f64; nseg * np];
        for (first, acc) in partials {
            for (j, v) in acc.into_iter().enumerate() {
                out[first * np + j] += v;
            }
        }
        Ok(out)
    }

    fn combine(
        &self,
        job: &Job,
        terms: &[Vector],
        seg: Segments,
        coefs: &[f32],
        out: &mut [u8],
    ) -> Result<()> {
        let m = job.models.len();
        let nt = terms.len();
        let osz = job.out_dtype.size();
        out.par_chunks_mut(CHUNK * osz).enumerate().for_each_init(
            || (Scratch::take(m), Vec::new()),
            |(s, v), (c, oc)| {
                let start = c * CHUNK;
                let len = oc.len() / osz;
                s.load_all(job, start, len, false);
                let mut acc = vec![0.0f32; len];
                for (k, t) in terms.iter().enumerate() {
                    vector_values(*t, s, len, v);
                    match seg {
                        Segments::Whole => {
                            let ck = coefs[k];
                            acc.iter_mut()
                                .zip(v.iter())
                                .for_each(|(a, x)| *a += ck * *x);
                        }
                        _ => {
                            for (e, (a, x)) in acc.iter_mut().zip(v.iter()).enumerate() {
                                *a += coefs[seg.of(start + e) * nt + k] * *x;
                            }
                        }
                    }
                }
                dtype::encode(job.out_dtype, &acc, oc);
            },
        );
        Ok(())
    }

    fn matmul(&self, a: &Mat, b: &Mat, ta: bool, tb: bool) -> Result<Mat> {
        let _t = super::linalg_time::matmul();
        crate::linalg::matmul(a, b, ta, tb)
    }

    fn svd(&self, a: &Mat, rank: Option<usize>) -> Result<Svd> {
        let _t = super::linalg_time::svd();
        crate::linalg::svd(a, rank)
    }
}

impl Fused for Cpu {
    fn masked_sums(&self, job: &Job, sp: &Sparsity, squares: bool) -> Result<Vec<[f64; 3]>> {
        let n = job.numel;
        let m = job.models.len();
        let ranks = della_ranks(job, sp);
        let var = sp.ranks_by_variance();
        let partials: Vec<(Vec<[f64; 3]>, ChunkBits)> = (0..chunks(n))
            .into_par_iter()
            .map_init(
                || Scratch::take(m),
                |s, c| {
                    let s: &mut Scratch = s;
                    let (start, len) = chunk_range(n, c);
                    s.load_all(job, start, len, true);
                    if var {
                        variance_keys(&s.x, len, &mut s.var);
                    }
                    let mut out = vec![[0.0f64; 3]; m];
                    let mut bits = vec![Vec::new(); m];
                    for (i, o) in out.iter_mut().enumerate() {
                        let cx = keep_ctx(job, sp, &ranks, i, &s.var[..len]);
                        let kb = &mut s.kb[i];
                        keep_bits(&sp.keep[i], &cx, start, &s.x[i][..len], kb);
                        // eight independent f64 lanes (in a fixed order): vectorised, and
                        // the same sums whatever the thread count
                        *o = if squares {
                            masked_lanes::<true>(&s.x[i][..len], kb)
                        } else {
                            masked_lanes::<false>(&s.x[i][..len], kb)
                        };
                        if drawn_at_random(&sp.keep[i]) {
                            bits[i] = kb.clone();
                        }
                    }
                    (out, bits)
                },
            )
            .collect();
        let mut tot = vec![[0.0f64; 3]; m];
        let mut bits = Vec::with_capacity(partials.len());
        for (p, b) in partials {
            for (t, v) in tot.iter_mut().zip(p) {
                (0..3).for_each(|j| t[j] += v[j]);
            }
            bits.push(b);
        }
        if sp.keep.iter().any(drawn_at_random) {
            *KEEP_BITS.lock().unwrap_or_else(|e| e.into_inner()) = Some(KeepBits {
                job: job.id,
                seed: sp.seed,
                keep: sp.keep.clone(),
                tables: sp.tables.clone(),
                bits,
            });
        }
        Ok(tot)
    }

    fn gta(&self, job: &Job, spec: &GtaSpec, out: &mut [u8]) -> Result<()> {
        let m = job.models.len();
        let osz = job.out_dtype.size();
        let sp = &spec.sparsity;
        let cached = take_keep_bits(job, sp);
        // DELLA's per-row ranks only feed its random keep, which the cached bits replace
        let ranks = match cached {
            Some(_) => vec![None; m],
            None => della_ranks(job, sp),
        };
        let var = sp.ranks_by_variance();
        let wsum: f32 = {
            let mut s = 0.0f32;
            spec.weights.iter().for_each(|w| s += *w);
            if s.abs() < 1e-8 {
                1.0
            } else {
                s
            }
        };
        let checks = ChunkChecks::default();
        out.par_chunks_mut(CHUNK * osz).enumerate().for_each_init(
            || Scratch::take(m),
            |s, (c, oc)| {
                let s: &mut Scratch = s;
                let start = c * CHUNK;
                let len = oc.len() / osz;
                s.load_all(job, start, len, true);
                // the inputs as they go by (cheap: the chunk is in cache); a non-finite base
                // or model value leaves a non-finite delta
                if job.base.is_some() {
                    checks.inputs(job, &s.base[..len]);
                }
                s.x.iter().for_each(|x| checks.inputs(job, &x[..len]));
                if var {
                    variance_keys(&s.x, len, &mut s.var);
                }
                // keep bits of every model into kb
                for i in 0..m {
                    let kb = &mut s.kb[i];
                    match cached.as_ref().map(|b| &b[c][i]) {
                        Some(bits) if !bits.is_empty() => {
                            kb.clear();
                            kb.extend_from_slice(bits);
                        }
                        _ => {
                            let cx = keep_ctx(job, sp, &ranks, i, &s.var[..len]);
                            keep_bits(&sp.keep[i], &cx, start, &s.x[i][..len], kb);
                        }
                    }
                }
                // then every step for 64 elements at a time (fewer passes over the chunk's buffers)
                let in_place = job.sink.is_none() && f32_in_place(job.out_dtype, oc);
                let mix: &mut [f32] = if in_place {
                    bytemuck::cast_slice_mut(oc)
                } else {
                    &mut s.acc[..len]
                };
                let (x, k, b) = (&mut s.x, &s.kb, &s.base[..len]);
                let full = len / 64 * 64;
                for o in (0..full).step_by(64) {
                    gta_lanes::<64>(x, k, b, spec, wsum, o, mix);
                }
                for o in full..len {
                    gta_lanes::<1>(x, k, b, spec, wsum, o, mix);
                }
                checks.output(job, mix);
                if !in_place {
                    emit(job, c, &s.acc[..len], oc, &mut s.obytes, &checks);
                }
            },
        );
        checks.finish(job, true)
    }

    fn fisher(&self, job: &Job, coefs: &[f32], floor: f32, out: &mut [u8]) -> Result<()> {
        let m = coefs.len();
        assert_eq!(job.models.len(), 2 * m, "fisher: a Fisher input per model");
        let osz = job.out_dtype.size();
        out.par_chunks_mut(CHUNK * osz).enumerate().for_each_init(
            || Scratch::take(2),
            |s, (c, oc)| {
                let s: &mut Scratch = s;
                let start = c * CHUNK;
                let len = oc.len() / osz;
                let (num, den) = (&mut s.acc[..len], &mut s.acc2[..len]);
                num.fill(0.0);
                den.fill(0.0);
                for (i, &ci) in coefs.iter().enumerate() {
                    let (x, f) = s.x.split_at_mut(1);
                    let (x, f) = (&mut x[0][..len], &mut f[0][..len]);
                    load(&job.models[i], start, job.load_dtype, x);
                    load(&job.models[m + i], start, job.load_dtype, f);
                    for e in 0..len {
                        let w = ci * (f[e] + floor);
                        num[e] += w * x[e];
                        den[e] += w;
                    }
                }
                num.iter_mut().zip(den.iter()).for_each(|(n, d)| *n /= *d);
                dtype::encode(job.out_dtype, num, oc);
            },
        );
        Ok(())
    }

    fn pcb(&self, job: &Job, spec: &PcbSpec, beta_of: Option<usize>, out: &mut [u8]) -> Result<()> {
        let m = job.models.len();
        let n = m as f32;
        let osz = job.out_dtype.size();
        out.par_chunks_mut(CHUNK * osz).enumerate().for_each_init(
            || Scratch::take(m),
            |s, (c, oc)| {
                let s: &mut Scratch = s;
                let start = c * CHUNK;
                let len = oc.len() / osz;
                s.load_all(job, start, len, true);
                for e in 0..len {
                    let mut sum = 0.0f32;
                    for x in &s.x {
                        sum += x[e];
                    }
                    let (mut num, mut den) = (0.0f32, 0.0f32);
                    for (i, x) in s.x.iter().enumerate() {
                        let t = x[e];
                        let a = t.abs().clamp(spec.lo[i], spec.hi[i]);
                        let mm = (a - spec.lo[i]) / (spec.hi[i] - spec.lo[i]);
                        let beta = (n * (mm * mm)).exp() * pcb_tanh(t * sum);
                        if beta_of == Some(i) {
                            num = beta;
                            break;
                        }
                        let sc = (beta.clamp(spec.q[i], spec.bmax[i]) - spec.q[i])
                            / (spec.bmax[i] - spec.q[i]);
                        let sg = if t > 0.0 {
                            1.0
                        } else if t < 0.0 {
                            -1.0
                        } else {
                            0.0
                        };
                        num += spec.weights[i] * (sg * a) * sc;
                        den += sc;
                    }
                    s.acc[e] = if beta_of.is_some() {
                        num
                    } else {
                        s.base[e] + num / den.max(1e-12)
                    };
                }
                dtype::encode(job.out_dtype, &s.acc[..len], oc);
            },
        );
        Ok(())
    }

    fn ternary(&self, job: &Job, threshold: u32, out: &mut [u8]) -> Result<()> {
        base_and_model(job, out, |b, x| {
            let d = x - b;
            if d.abs().to_bits() >= threshold {
                sign(d)
            } else {
                0.0
            }
        });
        Ok(())
    }

    fn nearswap(&self, job: &Job, t: f32, out: &mut [u8]) -> Result<()> {
        base_and_model(job, out, |b, x| {
            let w = (t / (b - x).abs().max(1e-6)).clamp(0.0, 1.0);
            w * x + (1.0 - w) * b
        });
        Ok(())
    }
}

/// `out = f(base, models[0])` element by element, chunk by chunk on every core, stored in
/// the output dtype.
fn base_and_model(job: &Job, out: &mut [u8], f: impl Fn(f32, f32) -> f32 + Sync) {
    let osz = job.out_dtype.size();
    out.par_chunks_mut(CHUNK * osz).enumerate().for_each_init(
        || Scratch::take(1),
        |s, (c, oc)| {
            let s: &mut Scratch = s;
            let len = oc.len() / osz;
            s.load_all(job, c * CHUNK, len, false);
            let (b, x) = (&s.base[..len], &s.x[0][..len]);
            for e in 0..len {
                s.acc[e] = f(b[e], x[e]);
            }
            dtype::encode(job.out_dtype, &s.acc[..len], oc);
        },
    );
}

/// Per model, one bit per element of a chunk (empty for models not drawn at random).
type ChunkBits = Vec<Vec<u64>>;

/// DARE/DELLA keep bits drawn by `masked_sums`, reused by the `gta` call that follows on the
/// same job: one Philox draw per element instead of two. Keyed by the job and its keep rules;
/// any other call finds no match and draws as before, so results do not depend on it.
struct KeepBits {
    job: u64,
    seed: u64,
    keep: Vec<Keep>,
    tables: Vec<Vec<u32>>,
    /// Per chunk.
    bits: Vec<ChunkBits>,
}

static KEEP_BITS: std::sync::Mutex<Option<KeepBits>> = std::sync::Mutex::new(None);

fn drawn_at_random(k: &Keep) -> bool {
    matches!(k, Keep::Random { .. } | Keep::Della { .. })
}

/// The keep bits `masked_sums` left for exactly this job and these rules, if any.
fn take_keep_bits(job: &Job, sp: &Sparsity) -> Option<Vec<ChunkBits>> {
    let mut g = KEEP_BITS.lock().unwrap_or_else(|e| e.into_inner());
    match &*g {
        Some(k)
            if k.job == job.id
                && k.seed == sp.seed
                && k.keep == sp.keep
                && k.tables == sp.tables =>
        {
            g.take().map(|k| k.bits)
        }
        _ => None,
    }
}

fn keep_ctx<'a>(
    job: &Job,
    sp: &'a Sparsity,
    ranks: &'a [Option<Vec<u32>>],
    i: usize,
    var: &'a [f32],
) -> KeepCtx<'a> {
    KeepCtx {
        stream: Stream::new(sp.seed, job.name, i as u32),
        var,
        ranks: ranks[i].as_deref(),
        table: match sp.keep[i] {
            Keep::Della { table, .. } => Some(&sp.tables[table]),
            _ => None,
        },
    }
}

/// The values of a vector over the loaded chunk.
fn vector_values(v: Vector, s: &Scratch, len: usize, out: &mut Vec<f32>) {
    out.clear();
    match v {
        Vector::Model(i) => out.extend_from_slice(&s.x[i][..len]),
        Vector::Base => out.extend_from_slice(&s.base[..len]),
        Vector::Ones => out.resize(len, 1.0),
        Vector::Delta(i) => {
            out.extend(s.x[i][..len].iter().zip(&s.base[..len]).map(|(x, b)| x - b))
        }
    }
}

/// Elements `o .. o + N` of a GTA chunk (`o` a multiple of 64 when N is 64): deltas in `x[i]`
/// (overwritten with their weighted, kept, rescaled values), keep bits in `k[i]` (element j
/// at bit j % 64 of word j / 64), base in `b`; the merged values go to `out`. Per element,
/// in this order: u = (d·k)·scale, v = u·w; the vote Σ v (or Σ u, or Σ sign) over the models
/// in order; the majority sign (+1 at zero); the sums of agreeing v and of agreeing weights;
/// the divisor floor; out = b + λ·(Σ / divisor).
#[inline(always)]
fn gta_lanes<const N: usize>(
    x: &mut [Vec<f32>],
    k: &[Vec<u64>],
    b: &[f32],
    spec: &GtaSpec,
    wsum: f32,
    o: usize,
    out: &mut [f32],
) {
    let mut vote = [0.0f32; N];
    for (i, (xi, ki)) in x.iter_mut().zip(k).enumerate() {
        let (sc, w) = (spec.scale[i], spec.weights[i]);
        let xi: &mut [f32; N] = (&mut xi[o..o + N]).try_into().unwrap();
        // bit l of the shifted word is element o + l
        let ki = &factors::<N>(ki[o / 64] >> (o % 64));
        // one loop per rule (u = unweighted, v = weighted value), so each vectorises
        let v = &mut vote;
        match (spec.consensus, spec.vote) {
            (Consensus::None, _) | (Consensus::Sum, Vote::Weighted) => {
                vote_lanes(xi, ki, sc, w, v, |_, v| v)
            }
            (Consensus::Sum, Vote::Unweighted) => vote_lanes(xi, ki, sc, w, v, |u, _| u),
            (Consensus::Count, Vote::Weighted) => vote_lanes(xi, ki, sc, w, v, |_, v| sign(v)),
            (Consensus::Count, Vote::Unweighted) => vote_lanes(xi, ki, sc, w, v, |u, _| sign(u)),
        }
    }
    let (mix, div) = match spec.consensus {
        Consensus::None => (vote, [wsum; N]),
        Consensus::Sum | Consensus::Count => {
            let maj = vote.map(|v| if v >= 0.0 { 1.0 } else { -1.0 });
            let (mut mix, mut div) = ([0.0f32; N], [0.0f32; N]);
            for (xi, &w) in x.iter().zip(&spec.weights) {
                let xi: &[f32; N] = (&xi[o..o + N]).try_into().unwrap();
                for l in 0..N {
                    let agree = (sign(xi[l]) == maj[l]) as u32 as f32;
                    mix[l] += xi[l] * agree;
                    div[l] += w * agree;
                }
            }
            match spec.div_floor {
                None => div.iter_mut().for_each(|d| {
                    if *d == 0.0 {
                        *d = 1.0
                    }
                }),
                Some(f) => div.iter_mut().for_each(|d| *d = d.max(f)),
            }
            (mix, div)
        }
    };
    let b: &[f32; N] = (&b[o..o + N]).try_into().unwrap();
    let out: &mut [f32; N] = (&mut out[o..o + N]).try_into().unwrap();
    for l in 0..N {
        let mut v = mix[l];
        if spec.normalize {
            v /= div[l];
        }
        if spec.lambda != 1.0 {
            v *= spec.lambda;
        }
        out[l] = b[l] + v;
    }
}

/// One model's step of [`gta_lanes`]: u = (d·k)·scale and v = u·w (v replaces d), and
/// `pick(u, v)` added to the vote.
#[inline(always)]
fn vote_lanes<const N: usize>(
    x: &mut [f32; N],
    k: &[f32; N],
    sc: f32,
    w: f32,
    vote: &mut [f32; N],
    pick: impl Fn(f32, f32) -> f32,
) {
    for l in 0..N {
        let u = (x[l] * k[l]) * sc;
        let v = u * w;
        x[l] = v;
        vote[l] += pick(u, v);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::select::select_with;

    fn f32_input(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The vectorised lane sums equal, bit for bit, eight scalar f64 lanes fed in element
    /// order, for lengths with and without a remainder (of 8, 64 and 512).
    #[test]
    fn masked_lanes_equal_scalar_lanes() {
        let mut rng = crate::rng::Stream::new(7, "masked", 0);
        for len in [0usize, 5, 8, 13, 64, 1000, 1024, 16 * 1024 + 3] {
            let words: Vec<u32> = (0..len.div_ceil(4) as u64)
                .flat_map(|b| rng.block(b))
                .take(len)
                .collect();
            let d: Vec<f32> = words
                .iter()
                .map(|w| (*w as i32 as f32) * 1e-9 * if w % 7 == 0 { 1e6 } else { 1.0 })
                .collect();
            let k: Vec<f32> = words.iter().map(|w| (w % 3 != 0) as u32 as f32).collect();
            let mut bits = vec![0u64; len.div_ceil(64)];
            for (j, kj) in k.iter().enumerate() {
                bits[j / 64] |= (*kj as u64) << (j % 64);
            }
            let mut lanes = [[0.0f64; 8]; 3];
            for e in 0..len {
                let l = e % 8;
                let a = d[e].abs() as f64;
                let kd = (d[e] * k[e]) as f64;
                lanes[0][l] += a;
                lanes[1][l] += a * k[e] as f64;
                lanes[2][l] += kd * kd;
            }
            let want = lanes.map(|t| t.iter().sum::<f64>());
            let got = masked_lanes::<true>(&d, &bits);
            let some = masked_lanes::<false>(&d, &bits);
            assert_eq!(
                (some[0], some[1], some[2]),
                (got[0], got[1], 0.0),
                "len {len}"
            );
            for j in 0..3 {
                assert_eq!(got[j].to_bits(), want[j].to_bits(), "len {len}, sum {j}");
            }
            rng = crate::rng::Stream::new(len as u64, "masked", 1);
        }
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

    /// The one-pass bracket selection gives exactly the cuts of the two-pass
    /// histogram selection, ties included, for ranks across the whole range.
    #[test]
    fn bracket_select_equals_histogram_select() {
        // sampled brackets, and below SMALL the whole range as the bracket
        for n in [64 * SAMPLE + 12345, 4 * SAMPLE, SMALL - 1, 3000] {
            bracket_equals_histogram(n);
        }
    }

    fn bracket_equals_histogram(n: usize) {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // coarse values: many ties at any threshold; and a few huge outliers
        let base: Vec<f32> = (0..n).map(|_| (next() % 1000) as f32 / 512.0).collect();
        let x: Vec<f32> = base
            .iter()
            .map(|b| {
                b + ((next() % 4001) as f32 - 2000.0) / 256.0
                    + if next() % 100_000 == 0 { 1e6 } else { 0.0 }
            })
            .collect();
        let (bb, xb) = (f32_input(&base), f32_input(&x));
        let job = Job::new(
            "b",
            Some(Input {
                bytes: &bb,
                dtype: DType::F32,
            }),
            vec![Input {
                bytes: &xb,
                dtype: DType::F32,
            }],
            DType::F32,
            DType::F32,
        );
        let nq = n as u64;
        let ks = [
            1,
            2,
            37,
            nq / 1000,
            nq / 10,
            nq / 3,
            nq / 2,
            nq - nq / 7,
            nq - 5,
            nq - 1,
        ];
        let qs: Vec<Query> = ks
            .iter()
            .flat_map(|&k| [Source::Delta(0), Source::Model(0)].map(|source| Query { source, k }))
            .collect();
        let fast = bracket_select(&job, &qs).expect("brackets hold on this data");
        let slow = select_with(
            &job,
            &qs,
            |j, s| Cpu.histogram(j, s),
            |j, s, t, q| Cpu.nth_equal(j, s, t, q),
        )
        .unwrap();
        assert_eq!(fast, slow);
    }

    #[test]
    fn row_ranks_ascending_with_index_ties() {
        // base 0; rows of 4: |d| = [2 1 2 0], [5 5 5 5]
        let d = [2.0f32, -1.0, 2.0, 0.0, 5.0, -5.0, 5.0, 5.0];
        let (b, x) = (f32_input(&[0.0; 8]), f32_input(&d));
        let job = Job::new(
            "r",
            Some(Input {
                bytes: &b,
                dtype: DType::F32,
            }),
            vec![Input {
                bytes: &x,
                dtype: DType::F32,
            }],
            DType::F32,
            DType::F32,
        );
        let r = row_ranks(&job, 0, RowLayout::along_dim1(&[2, 4]));
        assert_eq!(r, vec![2, 1, 3, 0, 0, 1, 2, 3]);
        // columns as rows: shape [4, 2] ranked along dim 0... via a 3-D view [1, 4, 2]
        let r = row_ranks(&job, 0, RowLayout::along_dim1(&[1, 4, 2]));
        // column 0: |d| at 0,2,4,6 = 2,2,5,5 -> 0,1,2,3; column 1: 1,0,5,5 -> 1,0,2,3
        assert_eq!(r, vec![0, 1, 1, 0, 2, 2, 3, 3]);
    }
}
