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

use std::sync::atomic::{AtomicU64, Ordering};

use crate::dtype::DType;
use crate::error::Result;

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
        }
    }

    pub fn out_bytes(&self) -> usize {
        self.numel * self.out_dtype.size()
    }
}

/// Which magnitudes a selection ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// |models[i] - base|
    Delta(usize),
    /// |models[i]|
    Model(usize),
}

/// A rank selection: the cut below which exactly `k` elements fall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub source: Source,
    pub k: u64,
}

/// Elements are ordered by magnitude descending, then by flat index ascending (the lower
/// index wins a tie). An element's rank is its position in that order. A `RankCut` for `k`
/// answers "is rank < k?" from the element's own magnitude bits `a = |x|.to_bits()` and index:
/// `a > bits || (a == bits && index < self.index)`.
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
        a > self.bits || (a == self.bits && index < self.index)
    }
}

/// Which elements of a delta survive sparsification.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Keep {
    All,
    Nothing,
    /// Rank in `[lo, hi)`: below `hi` and not below `lo`.
    Ranks {
        lo: RankCut,
        hi: RankCut,
    },
    /// Kept with probability `p`, drawn from the stream of (seed, tensor, model index).
    Random {
        p: f32,
    },
}

impl Keep {
    pub fn top(hi: RankCut) -> Keep {
        Keep::Ranks {
            lo: RankCut::NONE,
            hi,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consensus {
    None,
    /// Majority sign of the sum of weighted deltas (`>= 0` elects +).
    Sum,
    /// Majority of the signs of weighted deltas (`>= 0` elects +).
    Count,
}

/// The generalised task-arithmetic combine (mergekit's GTA), per element:
///
/// ```text
/// d_i  = x_i - b                      (x_i, b rounded to load_dtype)
/// wd_i = ((d_i * keep_i) * scale_i) * w_i
/// consensus none: mix = Σ wd_i,          div = Σ w_i (|div| < 1e-8 -> 1)
/// consensus sum:  maj = Σ wd_i >= 0 ? 1 : -1, a_i = sign(wd_i) == maj
///                 mix = Σ wd_i * a_i,    div = Σ w_i * a_i (0 -> 1)
/// out = b + ((normalize ? mix / div : mix) * lambda)
/// ```
/// Every sum runs over i = 0..M in order.
#[derive(Clone, Debug)]
pub struct GtaSpec {
    pub weights: Vec<f32>,
    pub keep: Vec<Keep>,
    pub scale: Vec<f32>,
    pub consensus: Consensus,
    pub normalize: bool,
    pub lambda: f32,
    pub seed: u64,
}

/// The primitive operations every backend provides.
pub trait Backend: Send + Sync {
    /// Human-readable name, e.g. `cpu (2 threads)` or `gpu: NVIDIA RTX 4090 (Vulkan)`.
    fn name(&self) -> String;

    /// Rank cuts for each query (see [`RankCut`]); exact, tie rule included.
    fn select(&self, job: &Job, queries: &[Query]) -> Result<Vec<RankCut>>;

    /// For each model i: [Σ|d_i|, Σ|d_i * keep_i|] with d_i = models[i] - base.
    fn masked_l1(&self, job: &Job, keep: &[Keep], seed: u64) -> Result<Vec<[f64; 2]>>;

    /// The GTA combine ([`GtaSpec`]) into `out` (job.out_dtype bytes).
    fn gta(&self, job: &Job, spec: &GtaSpec, out: &mut [u8]) -> Result<()>;

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

    /// Releases whatever the backend kept for this job (resident buffers).
    fn end_job(&self, _job: &Job) {}
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
