//! The fused per-method kernels: one pass over a job's inputs that does the whole of one
//! merge method's element arithmetic (or the statistics it needs), where composing the
//! generic primitives of [`Backend`](super::Backend) would take several passes. Each kernel
//! is specified here exactly, so the CPU and GPU implementations can be held to each other.
//!
//! [`Fused`] is a supertrait of `Backend`: code holding a `&dyn Backend` (or a generic
//! `B: Backend`) calls these without importing it; code holding a concrete `Cpu` or `Gpu`
//! imports `Fused`.

use super::{Job, RankCut, RowLayout};
use crate::error::Result;

/// The fused kernels every backend provides besides its generic primitives.
pub trait Fused {
    /// For each model i, with d_i = models[i] - base and k_i its keep mask:
    /// [Σ|d_i|, Σ|d_i·k_i|, Σ(d_i·k_i)²]; without `squares` the third may be left 0.
    fn masked_sums(&self, job: &Job, sparsity: &Sparsity, squares: bool) -> Result<Vec<[f64; 3]>>;

    /// The GTA combine ([`GtaSpec`]) into `out` (job.out_dtype bytes).
    fn gta(&self, job: &Job, spec: &GtaSpec, out: &mut [u8]) -> Result<()>;

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
}

/// Which key a rank band is judged on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// The model's own |delta|.
    Delta,
    /// The element's [`Source::Variance`](super::Source::Variance), the same for every model.
    Variance,
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

/// PCB-merging's per-element balancing (docs/ALGORITHMS.md §11) with the whole-model statistics
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
