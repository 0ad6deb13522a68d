//! The generalised task-arithmetic family (mergekit's `GeneralizedTaskArithmeticMerge`):
//! task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della,
//! della_linear.
//!
//! Every method is: per model, sparsify its delta (magnitude top-k, random keep, magnitude
//! band without outliers, or DELLA's rank-dependent random keep), optionally rescale the
//! survivors to the delta's L1 norm, weight, optionally elect a sign per element and keep
//! the agreeing deltas, divide by the agreeing weights if `normalize`, scale by `lambda`, add
//! to the base.

use super::{
    BasePolicy, Ctx, Default, EachJob, Kind, Method, MethodInfo, ParamSpec, Params, Scope,
};
use crate::backend::{
    keep_threshold, py_int_mul, Backend, Consensus, GtaSpec, Job, Keep, Key, Query, RowLayout,
    Segments, Source, Sparsity, Vector, Vote,
};
use crate::dtype::DType;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the `int(density·n)` largest |delta| (at least one).
    Magnitude,
    /// Keep each element with probability `density` (DARE).
    Random,
    /// Drop the `int(gamma·n)` largest as outliers, then the smallest, keeping
    /// `int(density·n)` (Model Breadcrumbs).
    MagnitudeOutliers,
    /// Keep each element with a probability from `density - epsilon` (smallest |delta| of
    /// its row) to `density + epsilon` (largest) (DELLA).
    DellaMagprune,
}

/// One method of the family: which sparsification, sign election, normalisation and
/// rescaling it applies. Each is its own [`Method`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub sparsify: Sparsify,
    pub consensus: Consensus,
    pub normalize: bool,
    pub rescale: bool,
}

fn spec(
    name: &'static str,
    pretty: &'static str,
    reference: &'static str,
    summary: &'static str,
    v: Variant,
) -> MethodInfo {
    let mut params = vec![
        ParamSpec {
            name: "weight",
            kind: Kind::Float,
            scope: Scope::NonBase,
            default: Default::Required,
            help: "weight of this model's task vector",
        },
        ParamSpec {
            name: "density",
            kind: Kind::Float,
            scope: Scope::NonBase,
            default: Default::Float(1.0),
            help: if v.sparsify == Sparsify::None {
                "accepted for compatibility; task_arithmetic keeps every element"
            } else {
                "fraction of the task vector's elements to keep"
            },
        },
    ];
    if v.sparsify == Sparsify::MagnitudeOutliers {
        params.push(ParamSpec {
            name: "gamma",
            kind: Kind::Float,
            scope: Scope::NonBase,
            default: Default::Float(0.01),
            help: "fraction of the largest-magnitude elements removed as outliers",
        });
    }
    if v.sparsify == Sparsify::DellaMagprune {
        params.push(ParamSpec {
            name: "epsilon",
            kind: Kind::Float,
            scope: Scope::NonBase,
            default: Default::Float(0.15),
            help: "keep probabilities spread over density ± epsilon by magnitude rank in each row",
        });
    }
    params.extend([
        ParamSpec {
            name: "normalize",
            kind: Kind::Bool,
            scope: Scope::Shared,
            default: Default::Bool(v.normalize),
            help: "divide by the sum of the (agreeing) weights",
        },
        ParamSpec {
            name: "rescale",
            kind: Kind::Bool,
            scope: Scope::Shared,
            default: Default::Bool(v.rescale),
            help: "after sparsifying, rescale the kept elements to the delta's L1 norm",
        },
        ParamSpec {
            name: "lambda",
            kind: Kind::Float,
            scope: Scope::Shared,
            default: Default::Float(1.0),
            help: "scale of the merged task vector",
        },
        ParamSpec {
            name: "lines_beta",
            kind: Kind::Float,
            scope: Scope::Shared,
            default: Default::Unset,
            help: "LiNeS: scale the merged task vector of layer l of L by lines_alpha + lines_beta·l/(L−1) (tensors outside the layers by lines_alpha); unset: off",
        },
        ParamSpec {
            name: "lines_alpha",
            kind: Kind::Float,
            scope: Scope::Shared,
            default: Default::Unset,
            help: "LiNeS: the scale of the shallowest layer (and of embeddings, final norm, heads); unset: the paper's (‖Σ τ‖₁ / ‖merged τ‖₁) / number of models, which is 1/(number of models) for task arithmetic and is computed in an extra pass over the model for the methods that sparsify or elect signs",
        },
        ParamSpec {
            name: "int8_mask",
            kind: Kind::Bool,
            scope: Scope::Shared,
            default: Default::Bool(false),
            help: "accepted for compatibility (a memory option of mergekit; no effect on results)",
        },
    ]);
    MethodInfo {
        name,
        pretty,
        reference,
        summary,
        params,
        base: BasePolicy::Required,
        models: (0, None),
        imp: Box::new(v),
    }
}

pub fn methods() -> Vec<MethodInfo> {
    use Consensus::{None as NoVote, Sum};
    let v = |sparsify, consensus, normalize, rescale| Variant {
        sparsify,
        consensus,
        normalize,
        rescale,
    };
    vec![
        spec(
            "task_arithmetic",
            "Task Arithmetic",
            "https://arxiv.org/abs/2212.04089",
            "base + λ·Σ wᵢ·(θᵢ − base).",
            v(Sparsify::None, NoVote, false, false),
        ),
        spec(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            "Trim each task vector to its largest magnitudes, elect a sign per element, average the agreeing ones.",
            v(Sparsify::Magnitude, Sum, true, false),
        ),
        spec(
            "dare_linear",
            "DARE (linear)",
            "https://arxiv.org/abs/2311.03099",
            "Randomly drop elements of each task vector, rescale the rest, add them up.",
            v(Sparsify::Random, NoVote, false, true),
        ),
        spec(
            "dare_ties",
            "DARE TIES",
            "https://arxiv.org/abs/2311.03099",
            "DARE's random drop and rescale, then TIES' sign election.",
            v(Sparsify::Random, Sum, false, true),
        ),
        spec(
            "breadcrumbs",
            "Model Breadcrumbs",
            "https://arxiv.org/abs/2312.06795",
            "Drop both the largest outliers and the smallest elements of each task vector, add the rest.",
            v(Sparsify::MagnitudeOutliers, NoVote, false, false),
        ),
        spec(
            "breadcrumbs_ties",
            "Model Breadcrumbs with TIES",
            "https://arxiv.org/abs/2312.06795",
            "Breadcrumbs' band selection, then TIES' sign election.",
            v(Sparsify::MagnitudeOutliers, Sum, false, false),
        ),
        spec(
            "della",
            "DELLA",
            "https://arxiv.org/abs/2406.11617",
            "Drop elements at random, larger magnitudes (by rank in their row) kept more often, rescale, then TIES' sign election and average.",
            v(Sparsify::DellaMagprune, Sum, true, true),
        ),
        spec(
            "della_linear",
            "DELLA (linear)",
            "https://arxiv.org/abs/2406.11617",
            "DELLA's rank-dependent drop and rescale, then a plain weighted sum.",
            v(Sparsify::DellaMagprune, NoVote, false, true),
        ),
    ]
}

/// DELLA ranks within the rows along dimension 1: tiles must hold whole slabs of them.
pub fn align(v: Variant, _params: &Params, shape: &[usize]) -> usize {
    if v.sparsify == Sparsify::DellaMagprune {
        RowLayout::along_dim1(shape).slab()
    } else {
        1
    }
}

/// DELLA's keep thresholds by ascending rank r in a row of `len`, as mergekit computes the
/// probabilities in f32: p_r = f32(density - epsilon) + (r / (len - 1)) · 2 · f32(epsilon).
pub fn della_table(density: f64, epsilon: f64, len: usize) -> Vec<u32> {
    let d0 = (density - epsilon) as f32;
    let e = epsilon as f32;
    let den = len.saturating_sub(1) as f32;
    (0..len)
        .map(|r| {
            // a row of one has no spread (mergekit divides 0 by 0 there)
            let rn = if len > 1 {
                (r as f32 / den).clamp(0.0, 1.0)
            } else {
                0.0
            };
            keep_threshold(d0 + rn * 2.0 * e)
        })
        .collect()
}

/// LiNeS (Wang et al. 2024, docs/ALGORITHMS.md §14): the factor on the merged task vector of a
/// tensor at `depth` (layer / (L − 1), None outside the layers): α + β·depth. Unless the
/// recipe gives `lines_alpha`, α is the paper's (‖Σ τ_t‖₁ / ‖τ_MTL‖₁) / T: for task
/// arithmetic exactly 1/T; for the methods that sparsify or elect signs, `auto` (computed
/// by [`globals`] in a pass over the whole model). None when LiNeS is off.
pub fn lines_scale(params: &Params, depth: Option<f64>, auto: Option<f64>) -> Option<f64> {
    let beta = params.shared_opt("lines_beta")?;
    let alpha = params
        .shared_opt("lines_alpha")
        .or(auto)
        .unwrap_or(1.0 / params.per_input.len().max(1) as f64);
    Some(alpha + beta * depth.unwrap_or(0.0))
}

/// Does this tensor's LiNeS α come from whole-model norms? LiNeS on, `lines_alpha` unset,
/// and a method whose merged task vector is not the plain sum (where α = 1/T exactly).
pub fn lines_auto(v: Variant, params: &Params) -> bool {
    params.shared_opt("lines_beta").is_some()
        && params.shared_opt("lines_alpha").is_none()
        && !(v.sparsify == Sparsify::None && v.consensus == Consensus::None)
}

/// LiNeS' α for the methods that sparsify or elect signs, as the paper computes it:
/// (‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁) / T, L1 norms over the whole model, Σ over the unpruned task
/// vectors, τ_MTL the method's own merged task vector (λ = 1, LiNeS off). This costs one
/// extra merge of every tensor. `[α]`, or empty when no tensor needs it.
pub fn globals(v: Variant, b: &dyn Backend, each: &EachJob, seed: u64) -> Result<Vec<f64>> {
    let (mut sum_l1, mut mtl_l1, mut t_models) = (0f64, 0f64, 0usize);
    let mut any = false;
    let l1 = |bytes: &[u8], minus: &[u8]| -> f64 {
        bytes
            .chunks_exact(4)
            .zip(minus.chunks_exact(4))
            .map(|(x, y)| {
                let d = f32::from_le_bytes(x.try_into().unwrap())
                    - f32::from_le_bytes(y.try_into().unwrap());
                d.abs() as f64
            })
            .sum()
    };
    each(&mut |job, params, shape| {
        if !lines_auto(v, params) {
            return Ok(());
        }
        any = true;
        let m = job.models.len();
        t_models = m;
        let job = Job::new(
            job.name,
            job.base,
            job.models.clone(),
            job.load_dtype,
            DType::F32,
        )
        .with_align(align(v, params, shape));
        let n = job.numel;
        let zeros = vec![0u8; n * 4];
        let mut sum = vec![0u8; n * 4];
        let deltas: Vec<Vector> = (0..m).map(Vector::Delta).collect();
        b.combine(&job, &deltas, Segments::Whole, &vec![1.0; m], &mut sum)?;
        sum_l1 += l1(&sum, &zeros);
        let mut base = sum;
        b.combine(&job, &[Vector::Base], Segments::Whole, &[1.0], &mut base)?;
        let mut p = params.clone();
        for (name, val) in p.shared.iter_mut() {
            match *name {
                "lines_beta" => *val = None,
                "lambda" => *val = Some(super::Value1::Float(1.0)),
                _ => {}
            }
        }
        let cx = Ctx {
            job: &job,
            shape,
            params: &p,
            seed,
            depth: None,
            globals: &[],
        };
        let mut merged = zeros;
        let r = run(v, b, &cx, &mut merged);
        b.end_job(&job);
        r?;
        mtl_l1 += l1(&merged, &base);
        Ok(())
    })?;
    if !any {
        return Ok(Vec::new());
    }
    if mtl_l1 <= 0.0 || mtl_l1.is_nan() {
        return Err(Error::Param {
            tensor: "(whole model)".into(),
            msg: "the merged task vector is zero, so LiNeS' α = ‖Σ τ‖₁ / ‖τ_merged‖₁ / T is undefined; set `lines_alpha`".into(),
        });
    }
    Ok(vec![sum_l1 / mtl_l1 / t_models as f64])
}

pub fn check(v: Variant, params: &Params) -> std::result::Result<(), String> {
    if params.shared_opt("lines_alpha").is_some() && params.shared_opt("lines_beta").is_none() {
        return Err(
            "`lines_alpha` is set but `lines_beta` is not; LiNeS needs `lines_beta` (0 scales every layer by lines_alpha)"
                .into(),
        );
    }
    for i in 0..params.per_input.len() {
        if params.input_f(i, "weight").is_none() {
            return Err(format!("input {i} has no weight"));
        }
        if v.sparsify == Sparsify::MagnitudeOutliers {
            let g = params.input_f(i, "gamma").unwrap_or(0.01);
            if !(0.0..=1.0).contains(&g) {
                return Err(format!(
                    "gamma {g} of input {i} is not a fraction in [0, 1]"
                ));
            }
        }
        if v.sparsify == Sparsify::DellaMagprune {
            let d = params.input_f(i, "density").unwrap_or(1.0);
            let e = params.input_f(i, "epsilon").unwrap_or(0.15);
            if d > 0.0 && d < 1.0 && (d + e >= 1.0 || d - e <= 0.0) {
                return Err(format!(
                    "input {i}: density {d} ± epsilon {e} must stay inside (0, 1) (mergekit refuses this too)"
                ));
            }
        }
    }
    Ok(())
}

pub fn run(v: Variant, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let job = cx.job;
    let m = job.models.len();
    let n = job.numel;
    let normalize = cx.params.shared_b("normalize");
    let rescale = cx.params.shared_b("rescale");
    let auto = if lines_auto(v, cx.params) {
        match cx.globals.first() {
            Some(a) => Some(*a),
            None => {
                return Err(cx.err(
                    "LiNeS' α comes from whole-model norms here, which were not computed (merge through a plan, or set `lines_alpha`)".into(),
                ))
            }
        }
    } else {
        None
    };
    let lambda = match lines_scale(cx.params, cx.depth, auto) {
        // one f64 product, rounded once: LiNeS multiplies the f32 task vector by a float64
        Some(s) => (cx.params.shared_f("lambda") * s) as f32,
        None => cx.params.shared_f("lambda") as f32,
    };

    let mut weights = Vec::with_capacity(m);
    let mut sp = Sparsity::new(vec![Keep::All; m], cx.seed);
    // (model, query slot of lo, query slot of hi) for rank-based keeps
    let mut queries: Vec<Query> = Vec::new();
    let mut pending: Vec<(usize, Option<usize>, usize)> = Vec::new();
    for (i, keep_i) in sp.keep.iter_mut().enumerate() {
        let w = cx
            .model_f(i, "weight")
            .ok_or_else(|| cx.err(format!("model {i} has no weight")))?;
        weights.push(w as f32);
        let density = cx.model_f(i, "density").unwrap_or(1.0);
        if v.sparsify == Sparsify::None || density >= 1.0 {
            continue;
        }
        match v.sparsify {
            Sparsify::None => {}
            Sparsify::Magnitude => {
                if density <= 0.0 || n == 0 {
                    *keep_i = Keep::Nothing;
                } else {
                    let k = py_int_mul(density, n).max(1);
                    pending.push((i, None, queries.len()));
                    queries.push(Query {
                        source: Source::Delta(i),
                        k,
                    });
                }
            }
            Sparsify::Random => *keep_i = Keep::Random { p: density as f32 },
            Sparsify::MagnitudeOutliers => {
                let gamma = cx.model_f(i, "gamma").unwrap_or(0.01);
                let target = py_int_mul(density, n);
                let n_top = py_int_mul(gamma, n);
                let n_bot = (n as u64).saturating_sub(target + n_top);
                // ascending ranks [n_bot, n_bot + target) are descending ranks
                // [n - n_bot - target, n - n_bot)
                let hi = n as u64 - n_bot;
                let lo = hi.saturating_sub(target);
                pending.push((i, Some(queries.len()), queries.len() + 1));
                queries.push(Query {
                    source: Source::Delta(i),
                    k: lo,
                });
                queries.push(Query {
                    source: Source::Delta(i),
                    k: hi,
                });
            }
            Sparsify::DellaMagprune => {
                if density <= 0.0 {
                    *keep_i = Keep::Nothing;
                } else {
                    let epsilon = cx.model_f(i, "epsilon").unwrap_or(0.15);
                    let rows = RowLayout::along_dim1(cx.shape);
                    *keep_i = Keep::Della {
                        rows,
                        table: sp.tables.len(),
                    };
                    sp.tables.push(della_table(density, epsilon, rows.len));
                }
            }
        }
    }
    if !queries.is_empty() {
        let cuts = b.select(job, &queries)?;
        for (i, lo, hi) in pending {
            sp.keep[i] = match lo {
                None => Keep::top(cuts[hi]),
                Some(lo) => Keep::Ranks {
                    lo: cuts[lo],
                    hi: cuts[hi],
                    key: Key::Delta,
                },
            };
        }
    }

    let mut scale = vec![1.0f32; m];
    if rescale && v.sparsify != Sparsify::None {
        let active: Vec<usize> = (0..m)
            .filter(|&i| !matches!(sp.keep[i], Keep::All | Keep::Nothing))
            .collect();
        if !active.is_empty() {
            let sums = b.masked_sums(job, &sp, false)?;
            for i in active {
                let (full, kept) = (sums[i][0] as f32, sums[i][1] as f32);
                if full >= 1e-7 && kept >= 1e-7 {
                    scale[i] = full / kept;
                }
            }
        }
    }
    b.gta(
        job,
        &GtaSpec {
            weights,
            sparsity: sp,
            scale,
            consensus: v.consensus,
            vote: Vote::Weighted,
            normalize,
            div_floor: None,
            lambda,
        },
        out,
    )
}

impl Method for Variant {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        run(*self, b, cx, out)
    }
    fn check(&self, params: &Params) -> std::result::Result<(), String> {
        check(*self, params)
    }
    fn align(&self, params: &Params, shape: &[usize]) -> usize {
        align(*self, params, shape)
    }
    fn wants_globals(&self, params: &Params) -> bool {
        lines_auto(*self, params)
    }
    fn whole_model(
        &self,
        b: &dyn Backend,
        each: &EachJob,
        seed: u64,
        _prior: Option<&serde_json::Value>,
    ) -> Result<Vec<f64>> {
        globals(*self, b, each, seed)
    }
    fn checks_inputs_on_the_way(&self) -> bool {
        true
    }
}
