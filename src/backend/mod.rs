//! The compute backends. Merge methods are written once, against [`Backend`]; the CPU and
//! the GPU each implement its primitives.
//!
//! - [`Backend`] (this file): the generic primitives (selection histograms, dot products,
//!   combines, conversions, weighted sums, matrix products, SVDs) and the job types.
//! - [`Fused`] ([`fused`]): the per-method fused kernels (GTA and its masked sums,
//!   NearSwap, Fisher, PCB, ComPEFT's ternarisation) and their specs. A supertrait of
//!   `Backend`, so a `&dyn Backend` reaches them.
//! - [`select`]: the exact rank selection built on `histogram` and `nth_equal`, shared by
//!   every backend.
//! - [`cpu`] and [`gpu`]: the two implementations.
//!
//! A backend works on a [`Job`]: the raw input bytes of one output tensor (memory-mapped,
//! in their stored dtype) and nothing else. Whether those bytes are decoded chunk by chunk
//! in CPU caches, or uploaded once and kept resident on a GPU, or streamed through the GPU
//! in tiles when they exceed its memory budget, is the backend's business. Every primitive
//! is specified exactly (element order, tie rules, rounding), so the backends can be held to
//! each other in tests: selections identical, arithmetic within a few f32 ulp.

pub mod cpu;
pub mod fused;
pub mod gpu;
pub mod select;

pub use fused::{
    keep_threshold, pcb_tanh, Consensus, Fused, GtaSpec, Keep, Key, PcbSpec, Sparsity, Vote,
};
pub use select::{bucket_of, py_int_mul};

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

/// The generic primitive operations every backend provides; the fused per-method kernels
/// come with it through [`Fused`].
pub trait Backend: Fused + Send + Sync {
    /// Human-readable name, e.g. `cpu (2 threads)` or `gpu: NVIDIA RTX 4090 (Vulkan)`.
    fn name(&self) -> String;

    /// For each (source, filter): a histogram of the high 16 bits of the source's key bits,
    /// or with a filter `Some(h)`, of the low 16 bits of the keys whose high bits are `h`.
    fn histogram(&self, job: &Job, sources: &[(Source, Option<u32>)]) -> Result<Vec<Vec<u64>>>;

    /// Flat index of the `q`-th (0-based, in index order) element whose key bits equal `bits`.
    fn nth_equal(&self, job: &Job, source: Source, bits: u32, q: u64) -> Result<u32>;

    /// Rank cuts for each query (see [`RankCut`]); exact, tie rule included.
    fn select(&self, job: &Job, queries: &[Query]) -> Result<Vec<RankCut>> {
        select::select_with(
            job,
            queries,
            |j, s| self.histogram(j, s),
            |j, s, t, q| self.nth_equal(j, s, t, q),
        )
    }

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

    /// `op(a) · op(b)`, op transposing when asked.
    fn matmul(&self, a: &Mat, b: &Mat, ta: bool, tb: bool) -> Result<Mat>;

    /// The singular value decomposition of `a`, truncated to `rank` singular triplets when
    /// given (all min(m, n) otherwise), singular values descending.
    fn svd(&self, a: &Mat, rank: Option<usize>) -> Result<Svd>;

    /// Releases whatever the backend kept for this job (resident buffers).
    fn end_job(&self, _job: &Job) {}
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
