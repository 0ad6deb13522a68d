//! The compute backends. Merge methods are written once, against [`Backend`]; the CPU and
//! the GPU each implement its primitives.
//!
//! A backend works on a [`Job`]: the raw input bytes of one output tensor (memory-mapped,
//! in their stored dtype) and nothing else. Whether those bytes are decoded chunk by chunk
//! in CPU caches, or uploaded once and kept resident on a GPU, or streamed through the GPU
//! in tiles when they exceed its memory budget, is the backend's business. Every primitive
//! is specified exactly (element order, tie rules, rounding), so the backends can be held to
//! each other in tests: selections identical, arithmetic within a few f32 ulp.

pub mod cpu;
pub mod gpu;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::dtype::DType;
use crate::error::Result;
use crate::linalg::{Mat, Svd};

/// One input tensor as stored: little-endian bytes and their dtype.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
}

impl<'a> Input<'a> {
    pub fn numel(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }
}

/// The inputs of one output tensor.
pub struct Job<'a> {
    /// Unique per job: lets a backend keep uploads resident across primitive calls.
    pub id: u64,
    /// The output tensor's name; it keys the random streams.
    pub name: &'a str,
    pub numel: usize,
    pub base: Option<Input<'a>>,
    /// The other inputs, in recipe order.
    pub models: Vec<Input<'a>>,
    /// Inputs are rounded to this precision as they are loaded (the recipe's `dtype`);
    /// F32 leaves them exact.
    pub load_dtype: DType,
    pub out_dtype: DType,
    /// Rows that must not be split between GPU tiles: tiles hold whole multiples of this
    /// many elements (1 when a method needs no row structure).
    pub align: usize,
    /// Where a backend may report what it saw of the inputs and output (see [`FiniteScan`]).
    pub scan: Option<&'a FiniteScan>,
    /// Another way into the output tensor's bytes: `sink(at, bytes)` writes `bytes` from byte
    /// `at`, with the same effect as copying them into the `out` slice a kernel is given.
    /// A kernel may use either for any part; the CPU writes whole chunks from its cache-hot
    /// scratch this way (see [`crate::io::writer::SlotFile::write_at`]).
    pub sink: Option<&'a Sink<'a>>,
}

/// See [`Job::sink`].
pub type Sink<'a> = dyn Fn(u64, &[u8]) -> Result<()> + Sync + 'a;

/// What a backend saw of a job's values on their way through, for the executor. Inputs:
/// `inputs_covered` when one call decoded every element of the base and of every model,
/// `inputs_nonfinite` when any of those, or a delta computed from them (finite inputs can
/// overflow), was NaN or infinite. Output: `output_covered` when that call wrote the job's
/// final output bytes, all of them, and `output_nonfinite` when one of them is NaN or
/// infinite. The executor needs no scan of its own over values found finite, and runs its
/// scans to name the model and element when something was not.
#[derive(Debug, Default)]
pub struct FiniteScan {
    pub inputs_covered: AtomicBool,
    pub inputs_nonfinite: AtomicBool,
    pub output_covered: AtomicBool,
    pub output_nonfinite: AtomicBool,
}

impl FiniteScan {
    /// Whether the inputs are known to be finite without another look at them.
    pub fn inputs_known_finite(&self) -> bool {
        self.inputs_covered.load(Ordering::Relaxed)
            && !self.inputs_nonfinite.load(Ordering::Relaxed)
    }

    /// Whether the output is known to be finite without another look at it.
    pub fn output_known_finite(&self) -> bool {
        self.output_covered.load(Ordering::Relaxed)
            && !self.output_nonfinite.load(Ordering::Relaxed)
    }

    /// Records what one call saw of every input element.
    pub fn record_inputs(&self, nonfinite: bool) {
        self.inputs_nonfinite.fetch_or(nonfinite, Ordering::Relaxed);
        self.inputs_covered.store(true, Ordering::Relaxed);
    }

    /// Records what one call saw of every output byte it wrote, as the job's final output.
    pub fn record_output(&self, nonfinite: bool) {
        self.output_nonfinite.fetch_or(nonfinite, Ordering::Relaxed);
        self.output_covered.store(true, Ordering::Relaxed);
    }
}

static NEXT_JOB: AtomicU64 = AtomicU64::new(1);

impl<'a> Job<'a> {
    pub fn new(
        name: &'a str,
        base: Option<Input<'a>>,
        models: Vec<Input<'a>>,
        load_dtype: DType,
        out_dtype: DType,
    ) -> Self {
        let numel = base
            .or(models.first().copied())
            .map(|i| i.numel())
            .unwrap_or(0);
        debug_assert!(models.iter().all(|m| m.numel() == numel));
        assert!(
            numel < u32::MAX as usize,
            "tensor {name} has 2^32 or more elements"
        );
        Job {
            id: NEXT_JOB.fetch_add(1, Ordering::Relaxed),
            name,
            numel,
            base,
            models,
            load_dtype,
            out_dtype,
            align: 1,
            scan: None,
            sink: None,
        }
    }

    /// Keeps runs of `align` elements (rows) inside one GPU tile.
    /// Lets the backend report on the values it decodes and writes (see [`FiniteScan`]).
    pub fn with_scan(mut self, scan: &'a FiniteScan) -> Self {
        self.scan = Some(scan);
        self
    }

    /// Gives kernels another way to write the output (see [`Job::sink`]).
    pub fn with_sink(mut self, sink: &'a Sink<'a>) -> Self {
        self.sink = Some(sink);
        self
    }

    pub fn with_align(mut self, align: usize) -> Self {
        self.align = align.max(1);
        self
    }

    pub fn out_bytes(&self) -> usize {
        self.numel * self.out_dtype.size()
    }
}

/// Which magnitudes a selection ranks (the key of an element).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// |models[i] - base|
    Delta(usize),
    /// |models[i]|
    Model(usize),
    /// The spread of the deltas at an element: Σ_i (d_i - m)² with m = (Σ_i d_i)·(1/M),
    /// d_i = models[i] - base, sums in model order. (M times the population variance: the
    /// same order, without a division.)
    Variance,
}

/// A rank selection: the cut below which exactly `k` elements fall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub source: Source,
    pub k: u64,
}

/// Elements are ordered by key (magnitude) descending, then by flat index ascending (the
/// lower index wins a tie). An element's rank is its position in that order. A `RankCut` for
/// `k` answers "is rank < k?" from the element's own key bits `a` (the f32 bits of a
/// non-negative key) and index: `a > bits || (a == bits && index < self.index)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RankCut {
    pub bits: u32,
    pub index: u32,
}

impl RankCut {
    /// rank < 0: nothing is below it.
    pub const NONE: RankCut = RankCut {
        bits: u32::MAX,
        index: 0,
    };
    /// Every element is below it.
    pub const ALL: RankCut = RankCut {
        bits: 0,
        index: u32::MAX,
    };

    #[inline(always)]
    pub fn below(&self, a: u32, index: u32) -> bool {
        // bitwise, not short-circuit: no branch to mispredict in the element loops
        (a > self.bits) | ((a == self.bits) & (index < self.index))
    }
}

/// Which key a rank band is judged on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// The model's own |delta|.
    Delta,
    /// The element's [`Source::Variance`], the same for every model.
    Variance,
}

/// How a tensor's elements form rows for per-row ranking: element (o, j, i) of a tensor
/// viewed as [outer, len, inner] is at flat index (o·len + j)·inner + i, and each (o, i) is a
/// row of `len` elements (mergekit ranks along dimension 1; 1-D tensors are one row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLayout {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
}

impl RowLayout {
    /// Rows along dimension 1 of `shape` (the whole tensor for 1-D).
    pub fn along_dim1(shape: &[usize]) -> RowLayout {
        match shape {
            [] => RowLayout {
                outer: 1,
                len: 1,
                inner: 1,
            },
            [n] => RowLayout {
                outer: 1,
                len: *n,
                inner: 1,
            },
            [a, b, rest @ ..] => RowLayout {
                outer: *a,
                len: *b,
                inner: rest.iter().product(),
            },
        }
    }
    pub fn rows(&self) -> usize {
        self.outer * self.inner
    }
    /// Elements of one outer slab: rows never straddle slabs.
    pub fn slab(&self) -> usize {
        self.len * self.inner
    }
    /// Flat index of element `j` of row `r`.
    #[inline(always)]
    pub fn index(&self, r: usize, j: usize) -> usize {
        let (o, i) = (r / self.inner, r % self.inner);
        (o * self.len + j) * self.inner + i
    }
}

/// Which elements of a delta survive sparsification.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Keep {
    All,
    Nothing,
    /// Rank in `[lo, hi)` by `key`: below `hi` and not below `lo`.
    Ranks {
        lo: RankCut,
        hi: RankCut,
        key: Key,
    },
    /// Kept with probability `p`, drawn from the stream of (seed, tensor, model index).
    Random {
        p: f32,
    },
    /// DELLA: an element of ascending |delta| rank r within its row is kept when its random
    /// word's top 24 bits are below `Sparsity::tables[table][r]`.
    Della {
        rows: RowLayout,
        table: usize,
    },
}

impl Keep {
    /// The `hi` largest by the model's own |delta|.
    pub fn top(hi: RankCut) -> Keep {
        Keep::Ranks {
            lo: RankCut::NONE,
            hi,
            key: Key::Delta,
        }
    }
}

/// Per-model keep rules, with what they need besides themselves.
#[derive(Clone, Debug, Default)]
pub struct Sparsity {
    pub keep: Vec<Keep>,
    /// Threshold tables of [`Keep::Della`]: entry r is ceil(p_r · 2^24).
    pub tables: Vec<Vec<u32>>,
    /// Seed of the random streams.
    pub seed: u64,
}

impl Sparsity {
    pub fn new(keep: Vec<Keep>, seed: u64) -> Self {
        Sparsity {
            keep,
            tables: Vec::new(),
            seed,
        }
    }

    /// Whether some rule ranks by the variance key (SCE), which then has to be computed.
    pub fn ranks_by_variance(&self) -> bool {
        self.keep.iter().any(|k| {
            matches!(
                k,
                Keep::Ranks {
                    key: Key::Variance,
                    ..
                }
            )
        })
    }
}

/// The integer threshold for "uniform u < p": u = U·2^-24 with integer U, so u < p exactly
/// when U < ceil(p·2^24).
pub fn keep_threshold(p: f32) -> u32 {
    ((p.clamp(0.0, 1.0) as f64) * 16_777_216.0).ceil() as u32
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consensus {
    None,
    /// Majority sign of the sum of the votes (`>= 0` elects +).
    Sum,
    /// Majority of the signs of the votes (`>= 0` elects +).
    Count,
}

/// What a model votes with in a sign election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vote {
    /// Its weighted delta `wd_i` (mergekit's GTA family).
    Weighted,
    /// Its delta before weighting, `(d_i * keep_i) * scale_i` (SCE).
    Unweighted,
}

/// The generalised task-arithmetic combine (mergekit's GTA, and SCE), per element:
///
/// ```text
/// d_i  = x_i - b                      (x_i, b rounded to load_dtype)
/// u_i  = (d_i * keep_i) * scale_i
/// wd_i = u_i * w_i
/// consensus none: mix = Σ wd_i,          div = Σ w_i (|div| < 1e-8 -> 1)
/// consensus sum:  maj = Σ vote_i >= 0 ? 1 : -1, a_i = sign(wd_i) == maj
///                 mix = Σ wd_i * a_i,    div = Σ w_i * a_i
///                 div: 0 -> 1, or max(div, div_floor) when a floor is given
/// out = b + ((normalize ? mix / div : mix) * lambda)
/// ```
/// `vote_i` is `wd_i` or `u_i` ([`Vote`]). Every sum runs over i = 0..M in order.
#[derive(Clone, Debug)]
pub struct GtaSpec {
    pub weights: Vec<f32>,
    pub sparsity: Sparsity,
    pub scale: Vec<f32>,
    pub consensus: Consensus,
    pub vote: Vote,
    pub normalize: bool,
    pub div_floor: Option<f32>,
    pub lambda: f32,
}

/// PCB-merging's per-element balancing (ALGORITHMS.md §11) with the whole-model statistics
/// of each task vector τ_i = models[i] − base, n = number of models:
///
/// ```text
/// sum  = Σ_i τ_i                                   (model order, from zero)
/// a_i  = clamp(|τ_i|, lo_i, hi_i)
/// β_i  = exp(n · ((a_i − lo_i)/(hi_i − lo_i))²) · tanh(τ_i · sum)
/// S_i  = (clamp(β_i, q_i, bmax_i) − q_i) / (bmax_i − q_i)
/// out  = base + (Σ_i w_i · sign(τ_i) · a_i · S_i) / max(Σ_i S_i, 1e-12)
/// ```
/// tanh is evaluated as `tanh(x) = x·(1 − x²/3 + 2x⁴/15 − 17x⁶/315 + 62x⁸/2835)` for
/// |x| < 0.1 and `sign(x)·(1 − e)/(1 + e)`, e = exp(−2|x|), above, on both backends.
#[derive(Clone, Debug)]
pub struct PcbSpec {
    pub lo: Vec<f32>,
    pub hi: Vec<f32>,
    pub q: Vec<f32>,
    pub bmax: Vec<f32>,
    pub weights: Vec<f32>,
}

/// tanh as [`PcbSpec`] specifies it (the WGSL kernel computes the same formula).
#[inline(always)]
pub fn pcb_tanh(x: f32) -> f32 {
    let a = x.abs();
    if a < 0.1 {
        let x2 = x * x;
        x * (1.0
            + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    } else {
        let e = (-2.0 * a).exp();
        ((1.0 - e) / (1.0 + e)).copysign(x)
    }
}

/// A vector formed from a job's inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vector {
    Model(usize),
    Base,
    /// models[i] - base
    Delta(usize),
    /// 1.0 at every element: paired with a vector in `dots` it gives that vector's sum.
    Ones,
}

/// How the elements of a tensor group into vectors for per-vector statistics and combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segments {
    /// One vector: the whole tensor, flattened.
    Whole,
    /// Contiguous runs of `len` elements: the rows of the last dimension.
    Rows { len: usize },
    /// Vector c holds elements c, c + cols, c + 2·cols, …: dimension 0 of a [n/cols, cols] view.
    Cols { cols: usize },
}

impl Segments {
    pub fn count(&self, n: usize) -> usize {
        match *self {
            Segments::Whole => 1,
            Segments::Rows { len } => n.div_ceil(len.max(1)),
            Segments::Cols { cols } => cols,
        }
    }
    /// Elements a GPU tile must hold whole multiples of for per-segment sums that do not
    /// depend on the tiling (see [`Job::with_align`]).
    pub fn align(&self) -> usize {
        match *self {
            Segments::Whole => 1,
            Segments::Rows { len } => len,
            Segments::Cols { cols } => 256 * cols,
        }
    }

    #[inline(always)]
    pub fn of(&self, e: usize) -> usize {
        match *self {
            Segments::Whole => 0,
            Segments::Rows { len } => e / len,
            Segments::Cols { cols } => e % cols,
        }
    }
}

/// The primitive operations every backend provides.
pub trait Backend: Send + Sync {
    /// Human-readable name, e.g. `cpu (2 threads)` or `gpu: NVIDIA RTX 4090 (Vulkan)`.
    fn name(&self) -> String;

    /// For each (source, filter): a histogram of the high 16 bits of the source's key bits,
    /// or with a filter `Some(h)`, of the low 16 bits of the keys whose high bits are `h`.
    fn histogram(&self, job: &Job, sources: &[(Source, Option<u32>)]) -> Result<Vec<Vec<u64>>>;

    /// Flat index of the `q`-th (0-based, in index order) element whose key bits equal `bits`.
    fn nth_equal(&self, job: &Job, source: Source, bits: u32, q: u64) -> Result<u32>;

    /// Rank cuts for each query (see [`RankCut`]); exact, tie rule included.
    fn select(&self, job: &Job, queries: &[Query]) -> Result<Vec<RankCut>> {
        cpu::select_with(
            job,
            queries,
            |j, s| self.histogram(j, s),
            |j, s, t, q| self.nth_equal(j, s, t, q),
        )
    }

    /// For each model i, with d_i = models[i] - base and k_i its keep mask:
    /// [Σ|d_i|, Σ|d_i·k_i|, Σ(d_i·k_i)²]; without `squares` the third may be left 0.
    fn masked_sums(&self, job: &Job, sparsity: &Sparsity, squares: bool) -> Result<Vec<[f64; 3]>>;

    /// The GTA combine ([`GtaSpec`]) into `out` (job.out_dtype bytes).
    fn gta(&self, job: &Job, spec: &GtaSpec, out: &mut [u8]) -> Result<()>;

    /// Whether this backend's `gta` and `weighted_sum` fill in the job's [`FiniteScan`]
    /// (they decode every element of every input they read, so they can see non-finite
    /// values on the way).
    fn scans_inputs(&self) -> bool {
        false
    }

    /// `out = models[0]`, rounded to the load dtype, stored in the output dtype.
    fn convert(&self, job: &Job, out: &mut [u8]) -> Result<()>;

    /// `out = (Σ_i w_i * models[i]) / divisor` (no division when `divisor` is None), the sum
    /// in model order starting from zero.
    fn weighted_sum(
        &self,
        job: &Job,
        weights: &[f32],
        divisor: Option<f32>,
        out: &mut [u8],
    ) -> Result<()>;

    /// For each segment s and pair p: the dot product of `vecs[p.0]` and `vecs[p.1]` over the
    /// segment's elements, as `out[s * pairs.len() + p]`.
    fn dots(
        &self,
        job: &Job,
        vecs: &[Vector],
        pairs: &[(usize, usize)],
        seg: Segments,
    ) -> Result<Vec<f64>>;

    /// `out = Σ_k coefs[s * terms.len() + k] * terms[k]` for the segment s of each element,
    /// summed in term order from zero.
    fn combine(
        &self,
        job: &Job,
        terms: &[Vector],
        seg: Segments,
        coefs: &[f32],
        out: &mut [u8],
    ) -> Result<()>;

    /// NearSwap: `w = clamp(t / max(|b - x|, 1e-6), 0, 1)`, `out = w·x + (1 - w)·b` with
    /// x = models[0], b = base.
    fn nearswap(&self, job: &Job, t: f32, out: &mut [u8]) -> Result<()>;

    /// Fisher-weighted average. With M = `coefs.len()`, models[0..M] are the weights θ_i and
    /// models[M..2M] their diagonal Fisher F_i; per element, in model order from zero:
    /// `w_i = coefs[i] · (F_i + floor)`, `out = (Σ w_i·θ_i) / (Σ w_i)`.
    fn fisher(&self, job: &Job, coefs: &[f32], floor: f32, out: &mut [u8]) -> Result<()>;

    /// PCB-merging ([`PcbSpec`]): with `beta_of = Some(i)` writes β_i instead of the merge.
    fn pcb(&self, job: &Job, spec: &PcbSpec, beta_of: Option<usize>, out: &mut [u8]) -> Result<()>;

    /// ComPEFT's ternarisation: with d = models[0] − base, `out = sign(d)` where
    /// |d| ≥ f32::from_bits(`threshold`) and 0 elsewhere (0 for d = 0, of either sign), in
    /// job.out_dtype.
    fn ternary(&self, job: &Job, threshold: u32, out: &mut [u8]) -> Result<()>;

    /// `op(a) · op(b)`, op transposing when asked.
    fn matmul(&self, a: &Mat, b: &Mat, ta: bool, tb: bool) -> Result<Mat>;

    /// The singular value decomposition of `a`, truncated to `rank` singular triplets when
    /// given (all min(m, n) otherwise), singular values descending.
    fn svd(&self, a: &Mat, rank: Option<usize>) -> Result<Svd>;

    /// Releases whatever the backend kept for this job (resident buffers).
    fn end_job(&self, _job: &Job) {}
}

/// In a [`Backend::histogram`] (summed over any number of jobs): the bucket holding
/// ascending position `j`, and `j`'s position inside it.
pub fn bucket_of(h: &[u64], j: u64) -> (u32, u64) {
    let mut cum = 0u64;
    for (b, &c) in h.iter().enumerate() {
        if cum + c > j {
            return (b as u32, j - cum);
        }
        cum += c;
    }
    unreachable!("position {j} beyond the histogram's {cum} elements")
}

/// Rounds a count product like Python's `int(density * n)` (truncation of the f64 product).
pub fn py_int_mul(fraction: f64, n: usize) -> u64 {
    let p = fraction * n as f64;
    if p <= 0.0 {
        0
    } else {
        p as u64
    }
}

/// Time spent in the dense linear algebra of every backend (SVDs, matrix products), so a
/// merge can report the share of its time they take. Only the outermost call on a thread
/// counts: the products inside a randomised SVD are part of the SVD's time.
pub mod linalg_time {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    static SVD_NS: AtomicU64 = AtomicU64::new(0);
    static SVD_CALLS: AtomicU64 = AtomicU64::new(0);
    static MATMUL_NS: AtomicU64 = AtomicU64::new(0);
    static MATMUL_CALLS: AtomicU64 = AtomicU64::new(0);

    thread_local! {
        static DEPTH: Cell<u32> = const { Cell::new(0) };
    }

    /// Counts the time until it is dropped.
    pub struct Guard {
        start: Instant,
        svd: bool,
    }

    fn enter(svd: bool) -> Guard {
        DEPTH.with(|d| d.set(d.get() + 1));
        Guard {
            start: Instant::now(),
            svd,
        }
    }

    pub fn svd() -> Guard {
        enter(true)
    }

    pub fn matmul() -> Guard {
        enter(false)
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            let outer = DEPTH.with(|d| {
                d.set(d.get() - 1);
                d.get() == 0
            });
            if outer {
                let ns = self.start.elapsed().as_nanos() as u64;
                let (t, c) = if self.svd {
                    (&SVD_NS, &SVD_CALLS)
                } else {
                    (&MATMUL_NS, &MATMUL_CALLS)
                };
                t.fetch_add(ns, Ordering::Relaxed);
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Totals since the process started; subtract two snapshots for an interval.
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    pub struct Totals {
        pub svd_seconds: f64,
        pub svd_calls: u64,
        pub matmul_seconds: f64,
        pub matmul_calls: u64,
    }

    pub fn snapshot() -> Totals {
        Totals {
            svd_seconds: SVD_NS.load(Ordering::Relaxed) as f64 * 1e-9,
            svd_calls: SVD_CALLS.load(Ordering::Relaxed),
            matmul_seconds: MATMUL_NS.load(Ordering::Relaxed) as f64 * 1e-9,
            matmul_calls: MATMUL_CALLS.load(Ordering::Relaxed),
        }
    }

    impl std::ops::Sub for Totals {
        type Output = Totals;
        fn sub(self, o: Totals) -> Totals {
            Totals {
                svd_seconds: self.svd_seconds - o.svd_seconds,
                svd_calls: self.svd_calls - o.svd_calls,
                matmul_seconds: self.matmul_seconds - o.matmul_seconds,
                matmul_calls: self.matmul_calls - o.matmul_calls,
            }
        }
    }
}
