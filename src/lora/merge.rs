//! Merging LoRA adapters into one adapter, with the semantics of PEFT's
//! `add_weighted_adapter` (peft 0.21.2; tests/fixtures/peft/README.md states them and the
//! fixtures check them).
//!
//! * Factor methods (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`) merge
//!   the A matrices among themselves and the B matrices among themselves, with weights
//!   `√|w·s|·sign(w·s)` on A and `√|w·s|` on B; pruning acts on each factor. B'A' then holds
//!   cross terms: it is not Σ w·s·B·A.
//! * `cat` stacks the ranks: A' = rows of (A_i·w_i)·s_i, B' = columns of B_i. Exact.
//! * SVD methods (`svd`, `ties_svd`, …) combine the dense ΔW_i = s_i·B_i·A_i (formed on the
//!   backend, one module at a time) with the raw weights, and re-factor the result with a
//!   truncated SVD on the backend: B' = U·diag(S), A' = Vᵀ.
//!
//! The merged adapter gets r = lora_alpha = r' and otherwise the first adapter's config, as
//! PEFT does (so a first adapter with `use_rslora` makes the merged scale √r').
//!
//! The elementwise combines work on the factors or on one module's ΔW, small host arrays;
//! the products and decompositions run on the backend.

use std::fmt;

use serde_json::{Map, Value};

use super::adapter::{delta_of, Adapter, ModuleKind, Targets, KEY_PREFIX};
use crate::backend::{py_int_mul, Backend};
use crate::error::{Error, Result};
use crate::io::model::natural_cmp;
use crate::linalg::Mat;
use crate::rng::Stream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Svd,
    Ties,
    TiesSvd,
    DareLinear,
    DareLinearSvd,
    DareTies,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

/// How the elementwise combine `f` of PEFT's merge_utils treats the tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Combine {
    /// Σ w T
    Sum,
    /// top-k by |x| of each, then Σ w T
    Magnitude,
    /// top-k, sign election, disjoint mean (count divisor)
    Ties,
    /// Bernoulli(density)/density, then Σ w T
    Dare,
    /// Bernoulli(density)/density, then the election and disjoint mean
    DareTies,
}

impl Combination {
    pub const ALL: &'static [(&'static str, Combination)] = &[
        ("linear", Combination::Linear),
        ("cat", Combination::Cat),
        ("svd", Combination::Svd),
        ("ties", Combination::Ties),
        ("ties_svd", Combination::TiesSvd),
        ("dare_linear", Combination::DareLinear),
        ("dare_linear_svd", Combination::DareLinearSvd),
        ("dare_ties", Combination::DareTies),
        ("dare_ties_svd", Combination::DareTiesSvd),
        ("magnitude_prune", Combination::MagnitudePrune),
        ("magnitude_prune_svd", Combination::MagnitudePruneSvd),
    ];

    pub fn from_name(s: &str) -> Option<Combination> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, c)| *c)
    }

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, c)| *c == self).unwrap().0
    }

    pub fn is_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    fn combine(self) -> Option<Combine> {
        use Combination::*;
        match self {
            Cat => None,
            Linear | Svd => Some(Combine::Sum),
            MagnitudePrune | MagnitudePruneSvd => Some(Combine::Magnitude),
            Ties | TiesSvd => Some(Combine::Ties),
            DareLinear | DareLinearSvd => Some(Combine::Dare),
            DareTies | DareTiesSvd => Some(Combine::DareTies),
        }
    }

    /// Whether the method prunes, and so needs a density.
    pub fn needs_density(self) -> bool {
        !matches!(self.combine(), None | Some(Combine::Sum))
    }

    pub fn is_random(self) -> bool {
        matches!(
            self.combine(),
            Some(Combine::Dare) | Some(Combine::DareTies)
        )
    }
}

impl fmt::Display for Combination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MajoritySign {
    /// sign of Σ T_i
    Total,
    /// sign of Σ sign(T_i)
    Frequency,
}

/// Which matrix a DARE mask is drawn for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    A,
    B,
    Delta,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::A => "lora_A",
            Part::B => "lora_B",
            Part::Delta => "delta",
        }
    }
}

/// Supplies DARE keep-masks in place of smelt's random draws (tests inject PEFT's masks):
/// (module, part, adapter index, element count) -> mask.
pub type MaskSource<'a> = &'a dyn Fn(&str, Part, usize, usize) -> Option<Vec<bool>>;

pub struct MergeOptions<'a> {
    pub combination: Combination,
    /// One per adapter.
    pub weights: Vec<f64>,
    pub density: Option<f64>,
    pub majority_sign: MajoritySign,
    /// Rank of the SVD methods' result (default: the largest input rank).
    pub svd_rank: Option<usize>,
    /// PEFT's `svd_clamp`: the quantile q in (0, 1] of the re-factored B' and A' values
    /// that both are clamped to, ±; SVD methods only.
    pub svd_clamp: Option<f64>,
    /// Seed of the DARE draws.
    pub seed: u64,
    pub masks: Option<MaskSource<'a>>,
}

/// One module of the merged adapter.
pub struct MergedModule {
    pub name: String,
    pub kind: ModuleKind,
    pub a: Mat,
    pub b: Mat,
}

pub struct MergedAdapter {
    pub config: Map<String, Value>,
    pub modules: Vec<MergedModule>,
    /// Full tensors carried over (`base_layer.weight` copies of the base): key, shape, data.
    pub full: Vec<(String, Vec<usize>, Vec<f32>)>,
    pub rank: usize,
    /// The merged adapter's scale (1, or √r' when the first adapter is rsLoRA).
    pub scale: f64,
    pub warnings: Vec<String>,
}

impl MergedAdapter {
    /// The tensors as PEFT names them in `adapter_model.safetensors`, in natural order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let mut out: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for m in &self.modules {
            let (ka, kb) = match m.kind {
                ModuleKind::Embedding => (
                    format!("{KEY_PREFIX}{}.lora_embedding_A", m.name),
                    format!("{KEY_PREFIX}{}.lora_embedding_B", m.name),
                ),
                ModuleKind::Linear { .. } => (
                    format!("{KEY_PREFIX}{}.lora_A.weight", m.name),
                    format!("{KEY_PREFIX}{}.lora_B.weight", m.name),
                ),
            };
            out.push((ka, vec![m.a.rows, m.a.cols], &m.a.data));
            out.push((kb, vec![m.b.rows, m.b.cols], &m.b.data));
        }
        for (k, s, d) in &self.full {
            out.push((k.clone(), s.clone(), d));
        }
        out.sort_by(|x, y| natural_cmp(&x.0, &y.0));
        out
    }

    /// ΔW of a merged module as PEFT applies it (s'·B'·A', in the base tensor's layout).
    pub fn delta(&self, m: &MergedModule, backend: &dyn Backend) -> Result<Mat> {
        delta_of(&m.a, &m.b, m.kind, self.scale, backend)
    }
}

fn err(msg: String) -> Error {
    Error::Other(msg)
}

/// The top `k` by |x| (ties: the lower index wins), as a keep mask.
fn top_k_mask(x: &[f32], k: usize) -> Vec<bool> {
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        x[b as usize]
            .abs()
            .total_cmp(&x[a as usize].abs())
            .then(a.cmp(&b))
    });
    let mut keep = vec![false; x.len()];
    for &i in &idx[..k.min(x.len())] {
        keep[i as usize] = true;
    }
    keep
}

fn sign(x: f32) -> i32 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

/// PEFT's merge_utils on same-length tensors: prune each as the method says, then combine
/// with `weights` (f32, as PEFT's weight tensor is).
#[allow(clippy::too_many_arguments)]
fn combine(
    method: Combine,
    tensors: &mut [Vec<f32>],
    weights: &[f32],
    density: f64,
    majority: MajoritySign,
    masks: &mut dyn FnMut(usize, usize) -> Vec<bool>,
) -> Vec<f32> {
    let n = tensors[0].len();
    let prune_all = density < 1.0;
    match method {
        Combine::Magnitude | Combine::Ties if prune_all => {
            let k = py_int_mul(density, n) as usize;
            for t in tensors.iter_mut() {
                let keep = top_k_mask(t, k);
                t.iter_mut()
                    .zip(&keep)
                    .for_each(|(x, &m)| *x = if m { *x } else { 0.0 });
            }
        }
        Combine::Dare | Combine::DareTies if prune_all => {
            let d = density as f32;
            for (i, t) in tensors.iter_mut().enumerate() {
                let keep = masks(i, n);
                t.iter_mut()
                    .zip(&keep)
                    .for_each(|(x, &m)| *x = if m { *x / d } else { 0.0 });
            }
        }
        _ => {}
    }
    let mut out = vec![0f32; n];
    match method {
        Combine::Sum | Combine::Magnitude | Combine::Dare => {
            for (t, &w) in tensors.iter().zip(weights) {
                out.iter_mut().zip(t).for_each(|(o, x)| *o += x * w);
            }
        }
        Combine::Ties | Combine::DareTies => {
            for (e, o) in out.iter_mut().enumerate() {
                let vote: f32 = match majority {
                    MajoritySign::Total => tensors.iter().map(|t| t[e]).sum(),
                    MajoritySign::Frequency => tensors.iter().map(|t| sign(t[e]) as f32).sum(),
                };
                let maj = if vote >= 0.0 { 1 } else { -1 };
                let mut mix = 0f32;
                let mut count = 0f32;
                for (t, &w) in tensors.iter().zip(weights) {
                    if sign(t[e]) == maj {
                        mix += t[e] * w;
                        count += 1.0;
                    }
                }
                *o = mix / count.max(1.0);
            }
        }
    }
    out
}

/// The union of the adapters' `target_modules`, as PEFT forms it.
fn union_targets(adapters: &[&Adapter]) -> Value {
    let all: Vec<&Targets> = adapters.iter().map(|a| &a.config.target_modules).collect();
    if all.iter().all(|t| matches!(t, Targets::Regex(_))) {
        let parts: Vec<String> = all
            .iter()
            .map(|t| match t {
                Targets::Regex(r) => format!("({r})"),
                _ => unreachable!(),
            })
            .collect();
        return Value::String(parts.join("|"));
    }
    let mut names: Vec<String> = Vec::new();
    for a in adapters {
        match &a.config.target_modules {
            Targets::List(l) => names.extend(l.iter().cloned()),
            // A regex mixed with lists, or none: list the modules the adapter has.
            _ => names.extend(
                a.modules
                    .iter()
                    .map(|m| m.name.rsplit('.').next().unwrap_or(&m.name).to_string()),
            ),
        }
    }
    names.sort();
    names.dedup();
    Value::Array(names.into_iter().map(Value::String).collect())
}

/// Merges `adapters` into one, as `add_weighted_adapter(adapters, weights, ...)` would.
pub fn merge(
    adapters: &[&Adapter],
    opts: &MergeOptions,
    backend: &dyn Backend,
) -> Result<MergedAdapter> {
    if adapters.is_empty() {
        return Err(err("no adapters to merge".into()));
    }
    if opts.weights.len() != adapters.len() {
        return Err(err(format!(
            "{} weights for {} adapters; give one weight per adapter",
            opts.weights.len(),
            adapters.len()
        )));
    }
    for a in adapters {
        a.check_finite()?;
    }
    let mut warnings = Vec::new();
    if let Some(q) = opts.svd_clamp {
        if !opts.combination.is_svd() {
            return Err(err(format!(
                "svd_clamp applies to the SVD methods only, not {}",
                opts.combination
            )));
        }
        if !(q > 0.0 && q <= 1.0) {
            return Err(err(format!("svd_clamp {q} is not a quantile in (0, 1]")));
        }
    }
    // One adapter: PEFT runs `linear` whatever was asked.
    let combination = if adapters.len() == 1 && opts.combination != Combination::Linear {
        warnings.push(format!(
            "one adapter: PEFT merges it with `linear`, not `{}`{}; so does smelt",
            opts.combination,
            if opts.svd_clamp.is_some() {
                ", and ignores svd_clamp"
            } else {
                ""
            }
        ));
        Combination::Linear
    } else {
        opts.combination
    };
    let density = match (combination.needs_density(), opts.density) {
        (true, None) => {
            return Err(err(format!(
                "{combination} prunes and needs --density (the fraction kept, in (0, 1]); PEFT has no default"
            )))
        }
        (_, Some(d)) if !(0.0..=1.0).contains(&d) || d.is_nan() => {
            return Err(err(format!("density {d} is outside [0, 1]")))
        }
        (_, d) => d.unwrap_or(1.0),
    };
    if combination.needs_density() && density >= 1.0 {
        warnings.push(format!(
            "density {density} keeps everything: {combination} prunes nothing"
        ));
    }
    check_modules_to_save(adapters, &mut warnings)?;
    let ranks: Vec<usize> = adapters.iter().map(|a| a.config.max_rank()).collect();
    let rank = match combination {
        Combination::Cat => ranks
            .iter()
            .try_fold(0usize, |s, &r| s.checked_add(r))
            .ok_or_else(|| err(format!("cat: the sum of the adapters' ranks ({ranks:?}) overflows; check their adapter_config.json `r`")))?,
        c if c.is_svd() => match opts.svd_rank {
            None => *ranks.iter().max().unwrap(),
            Some(r) => {
                // A truncated SVD of an m×n ΔW has at most min(m, n) ranks; anything beyond
                // that (on the largest module) would only be zero padding, and a huge value
                // would allocate factors of that many rows.
                let cap = adapters
                    .iter()
                    .flat_map(|a| a.modules.iter())
                    .map(|m| {
                        let [o, i] = m.delta_shape();
                        o.min(i)
                    })
                    .max()
                    .unwrap_or(0)
                    .max(1);
                if r > cap {
                    warnings.push(format!(
                        "--svd-rank {r} is more than any module can hold (min(rows, columns) of the largest ΔW is {cap}); using {cap}"
                    ));
                    cap
                } else {
                    r
                }
            }
        },
        _ => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                let list: Vec<String> = adapters
                    .iter()
                    .zip(&ranks)
                    .map(|(a, r)| format!("{} r={r}", a.label))
                    .collect();
                return Err(err(format!(
                    "{combination} merges the A and B factors elementwise, so every adapter needs the same rank ({}); use cat, svd or one of the *_svd methods for different ranks",
                    list.join(", ")
                )));
            }
            ranks[0]
        }
    };
    if rank == 0 {
        return Err(err("the merged rank would be 0".into()));
    }

    // Modules: every module any adapter has, in natural order.
    let mut names: Vec<(String, ModuleKind)> = Vec::new();
    for a in adapters {
        for m in &a.modules {
            match names.iter().find(|(n, _)| *n == m.name) {
                Some((_, k)) if *k != m.kind => {
                    return Err(err(format!(
                        "module {}: {} has a {:?} LoRA but an earlier adapter has a {k:?} one",
                        m.name, a.label, m.kind
                    )))
                }
                Some(_) => {}
                None => names.push((m.name.clone(), m.kind)),
            }
        }
    }
    names.sort_by(|x, y| natural_cmp(&x.0, &y.0));

    let first = &adapters[0].config;
    let new_scale = first.scale(rank, rank as f64);
    if first.use_rslora {
        warnings.push(format!(
            "the first adapter ({}) uses rsLoRA: as in PEFT, the merged adapter inherits use_rslora with r = lora_alpha = {rank}, so it applies √{rank} = {:.4} times the ΔW it was built from; list a non-rsLoRA adapter first to avoid it",
            adapters[0].label, new_scale
        ));
    }

    let stream_for = |module: &str, part: Part, i: usize| {
        Stream::new(
            opts.seed,
            &format!("lora:{module}:{}", part.name()),
            i as u32,
        )
    };
    let draw = |module: &str, part: Part, i: usize, n: usize| -> Vec<bool> {
        if let Some(src) = opts.masks {
            if let Some(m) = src(module, part, i, n) {
                return m;
            }
        }
        let s = stream_for(module, part, i);
        let p = density as f32;
        (0..n).map(|e| s.uniform_at(e as u64) < p).collect()
    };

    let mut modules = Vec::new();
    for (name, kind) in &names {
        // (adapter index, module) for the adapters that have this module
        let present: Vec<(usize, &super::LoraModule)> = adapters
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.module(name).map(|m| (i, m)))
            .collect();
        let shape = present[0].1.delta_shape();
        for (i, m) in &present {
            if m.delta_shape() != shape {
                return Err(err(format!(
                    "module {name}: {} makes a ΔW of {:?} but {} one of {shape:?}; were these adapters trained on the same base model?",
                    adapters[*i].label,
                    m.delta_shape(),
                    adapters[present[0].0].label
                )));
            }
        }
        let (a, b) = match combination {
            Combination::Cat => {
                let din = present[0].1.a_shape[1];
                let dout = present[0].1.b_shape[0];
                let mut a = Mat::zeros(rank, din);
                let mut b = Mat::zeros(dout, rank);
                let mut at = 0;
                for (i, m) in &present {
                    let ad = adapters[*i];
                    let (w, s) = (opts.weights[*i] as f32, m.scale as f32);
                    let ai = ad.a(m);
                    let bi = ad.b(m);
                    for r in 0..m.r {
                        for c in 0..din {
                            a.data[(at + r) * din + c] = (ai.at(r, c) * w) * s;
                        }
                        for o in 0..dout {
                            b.data[o * rank + at + r] = bi.at(o, r);
                        }
                    }
                    at += m.r;
                }
                (a, b)
            }
            c if c.is_svd() => {
                let mut deltas = Vec::new();
                for (i, m) in &present {
                    deltas.push(adapters[*i].delta(m, backend)?.data);
                }
                let w: Vec<f32> = present
                    .iter()
                    .map(|(i, _)| opts.weights[*i] as f32)
                    .collect();
                let mut masks = |j: usize, n: usize| draw(name, Part::Delta, present[j].0, n);
                let d = combine(
                    c.combine().unwrap(),
                    &mut deltas,
                    &w,
                    density,
                    opts.majority_sign,
                    &mut masks,
                );
                let mut dm = Mat {
                    rows: shape[0],
                    cols: shape[1],
                    data: d,
                };
                if kind.transposed() {
                    dm = dm.transpose();
                }
                let (mut a, mut b) = refactor(&dm, rank, backend)?;
                if let Some(q) = opts.svd_clamp {
                    // the ranks the SVD gave (zero padding beyond them is not PEFT's)
                    let k = rank.min(dm.rows).min(dm.cols);
                    clamp_factors(&mut a, &mut b, k, q);
                }
                (a, b)
            }
            c => {
                let r0 = present[0].1.r;
                if let Some((i, m)) = present.iter().find(|(_, m)| m.r != r0) {
                    return Err(err(format!(
                        "module {name}: {} has rank {} here but {} has rank {r0} (rank_pattern); {c} needs equal ranks",
                        adapters[*i].label, m.r, adapters[present[0].0].label
                    )));
                }
                let mut wa = Vec::new();
                let mut wb = Vec::new();
                for (i, m) in &present {
                    let x = opts.weights[*i] * m.scale;
                    let root = x.abs().sqrt();
                    wa.push((if x >= 0.0 { root } else { -root }) as f32);
                    wb.push(root as f32);
                }
                let mut as_: Vec<Vec<f32>> = present
                    .iter()
                    .map(|(i, m)| adapters[*i].a(m).data)
                    .collect();
                let mut bs: Vec<Vec<f32>> = present
                    .iter()
                    .map(|(i, m)| adapters[*i].b(m).data)
                    .collect();
                let f = c.combine().unwrap();
                let mut ma = |j: usize, n: usize| draw(name, Part::A, present[j].0, n);
                let a = combine(f, &mut as_, &wa, density, opts.majority_sign, &mut ma);
                let mut mb = |j: usize, n: usize| draw(name, Part::B, present[j].0, n);
                let b = combine(f, &mut bs, &wb, density, opts.majority_sign, &mut mb);
                let m0 = present[0].1;
                (
                    Mat {
                        rows: m0.a_shape[0],
                        cols: m0.a_shape[1],
                        data: a,
                    },
                    Mat {
                        rows: m0.b_shape[0],
                        cols: m0.b_shape[1],
                        data: b,
                    },
                )
            }
        };
        modules.push(MergedModule {
            name: name.clone(),
            kind: *kind,
            a,
            b,
        });
    }

    // Full base_layer copies (written by PEFT for embedding targets) carry over from the
    // first adapter that has each; trained modules_to_save copies do not (see
    // `check_modules_to_save`).
    let mut full: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for a in adapters {
        for t in a.replaced_tensors() {
            if a.is_saved_module_tensor(t) {
                continue;
            }
            let info = a.replacement(t).unwrap();
            if full.iter().any(|(k, _, _)| *k == info.name) {
                continue;
            }
            full.push((
                info.name.clone(),
                info.shape.clone(),
                a.matrix(&info.name).data,
            ));
        }
    }

    let mut config = first.raw.clone();
    config.insert("r".into(), rank.into());
    config.insert("lora_alpha".into(), rank.into());
    config.insert("target_modules".into(), union_targets(adapters));
    config.insert("rank_pattern".into(), Value::Object(Map::new()));
    config.insert("alpha_pattern".into(), Value::Object(Map::new()));
    config.insert("peft_type".into(), "LORA".into());
    if first
        .raw
        .get("modules_to_save")
        .is_some_and(|v| !v.is_null())
    {
        // PEFT lists the first adapter's modules_to_save and saves copies of the base's
        // modules for them; smelt has no base here, and without the list the module loads
        // as the base's: the same model.
        config.insert("modules_to_save".into(), Value::Null);
    }
    Ok(MergedAdapter {
        config,
        modules,
        full,
        rank,
        scale: new_scale,
        warnings,
    })
}

/// Whether a modules_to_save entry (PEFT matches a module `m` when `m == e` or `m` ends
/// with `.e`) and a module name, or two entries, name the same module.
fn same_module(x: &str, y: &str) -> bool {
    x == y || x.ends_with(&format!(".{y}")) || y.ends_with(&format!(".{x}"))
}

/// `modules_to_save` as PEFT 0.21.2's `add_weighted_adapter` treats it: two adapters with a
/// trained copy of the same module are refused (PEFT raises "Cannot add weighted adapters if
/// they target the same module with modules_to_save"); otherwise the merge goes ahead and
/// the trained copies are dropped: the merged config copies the first adapter's
/// `modules_to_save` list, but the copy PEFT makes for the new adapter is a fresh deepcopy
/// of the base module, so the merged adapter leaves those modules as in the base
/// (fixture merge_mts_a_cat). smelt warns that the trained copies are not carried.
fn check_modules_to_save(adapters: &[&Adapter], warnings: &mut Vec<String>) -> Result<()> {
    // per adapter: the modules it has copies of (tensors) and the names its config lists
    let saved: Vec<Vec<String>> = adapters
        .iter()
        .map(|a| {
            let mut v = a.saved_modules();
            v.extend(a.config.modules_to_save.iter().cloned());
            v
        })
        .collect();
    for j in 0..adapters.len() {
        for i in 0..j {
            let shared = saved[i]
                .iter()
                .find(|x| saved[j].iter().any(|y| same_module(x, y)));
            if let Some(m) = shared {
                return Err(err(format!(
                    "{} and {} both carry a trained copy of module {m} (modules_to_save): two full copies of one module cannot be merged as LoRA factors, and neither can be preferred, so PEFT's add_weighted_adapter refuses this too (\"Cannot add weighted adapters if they target the same module with modules_to_save\"). Apply the adapters to the base model and merge the models instead: a recipe entry `{{model: BASE, adapters: [...]}}` per adapter",
                    adapters[i].label, adapters[j].label
                )));
            }
        }
    }
    for (a, s) in adapters.iter().zip(&saved) {
        if !s.is_empty() {
            let mut names = a.saved_modules();
            if names.is_empty() {
                names = a.config.modules_to_save.clone();
            }
            warnings.push(format!(
                "{} has modules_to_save ({}): as in PEFT's add_weighted_adapter, the merged adapter does not carry their trained copies (PEFT saves copies of the base's modules instead), so those modules stay as in the base model; to keep them, apply the adapters to the base and merge the models in a recipe",
                a.label,
                names.join(", ")
            ));
        }
    }
    Ok(())
}

/// B' = U[:, :r]·diag(S[:r]), A' = Vᵀ[:r] from the SVD of `d` on the backend; zero ranks
/// pad the factors when `d` has fewer than `r` singular values.
pub fn refactor(d: &Mat, r: usize, backend: &dyn Backend) -> Result<(Mat, Mat)> {
    let svd = backend.svd(d, Some(r))?;
    let k = svd.s.len();
    let mut b = Mat::zeros(d.rows, r);
    let mut a = Mat::zeros(r, d.cols);
    for j in 0..k.min(r) {
        // a singular pair's sign is arbitrary and differs between SVD algorithms (the CPU's
        // exact SVD, the GPU's randomised one): fix it so the largest |entry| of row j of
        // A' is positive. B'·A' is unchanged (both factors flip), and the factors, hence
        // --svd-clamp's quantile over their signed values, agree across backends.
        let row = &svd.vt.data[j * d.cols..(j + 1) * d.cols];
        let big = row
            .iter()
            .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
        let f = if big < 0.0 { -1.0 } else { 1.0 };
        for i in 0..d.rows {
            b.data[i * r + j] = f * (svd.u.at(i, j) * svd.s[j]);
        }
        for (o, x) in a.data[j * d.cols..(j + 1) * d.cols].iter_mut().zip(row) {
            *o = f * x;
        }
    }
    Ok((a, b))
}

/// PEFT's `svd_clamp` on re-factored factors: hi = `torch.quantile(cat(B'.flatten(),
/// A'.flatten()), q)` over the first `k` ranks, and every value of both clamped to
/// [−hi, hi]. Returns hi.
///
/// The quantile is torch's (`interpolation="linear"`), reproduced to the bit (checked
/// against torch 2.15 on 4000 random cases and on the fixture): q rounded to f32 (the
/// tensor's dtype), the values sorted in f32, rank = q·(n − 1) in f64, weight
/// w = rank − ⌊rank⌋ rounded to f32, and torch's lerp of the two neighbours a ≤ b in f32
/// with fused multiply-adds: a + w·(b − a) for w < 0.5, else b − (b − a)·(1 − w).
pub fn clamp_factors(a: &mut Mat, b: &mut Mat, k: usize, q: f64) -> f32 {
    let k = k.min(a.rows).min(b.cols);
    let mut vals: Vec<f32> = Vec::with_capacity(k * (a.cols + b.rows));
    for i in 0..b.rows {
        vals.extend_from_slice(&b.data[i * b.cols..i * b.cols + k]);
    }
    vals.extend_from_slice(&a.data[..k * a.cols]);
    if vals.is_empty() {
        return 0.0;
    }
    vals.sort_by(|x, y| x.total_cmp(y));
    let rank = (q as f32) as f64 * (vals.len() - 1) as f64;
    let (lo, hi_i) = (rank.floor() as usize, rank.ceil() as usize);
    let w = (rank - lo as f64) as f32;
    let (x0, x1) = (vals[lo], vals[hi_i.min(vals.len() - 1)]);
    let d = x1 - x0;
    let hi = if w.abs() < 0.5 {
        w.mul_add(d, x0)
    } else {
        (-d).mul_add(1.0 - w, x1)
    };
    // torch's clamp(min, max) is min(max(x, min), max)
    let clamp = |x: &mut f32| *x = x.max(-hi).min(hi);
    for i in 0..b.rows {
        b.data[i * b.cols..i * b.cols + k]
            .iter_mut()
            .for_each(clamp);
    }
    a.data[..k * a.cols].iter_mut().for_each(clamp);
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_by_hand() {
        // Two tensors, density 1: election on the unweighted values, count divisor.
        let mut t = vec![vec![1.0, -2.0, 0.0, 3.0], vec![-3.0, -1.0, 2.0, 1.0]];
        let out = combine(
            Combine::Ties,
            &mut t,
            &[0.5, 2.0],
            1.0,
            MajoritySign::Total,
            &mut |_, _| unreachable!(),
        );
        // e0: 1-3=-2 -> -, only t1 agrees: -3*2/1 = -6
        // e1: -3 -> -, both: (-2*0.5 + -1*2)/2 = -1.5
        // e2: 2 -> +, t1 only (0 never agrees): 2*2/1 = 4
        // e3: 4 -> +, both: (1.5 + 2)/2 = 1.75
        assert_eq!(out, vec![-6.0, -1.5, 4.0, 1.75]);
        let mut t = vec![vec![1.0, 1.0], vec![1.0, -5.0], vec![-1.0, 1.0]];
        let out = combine(
            Combine::Ties,
            &mut t,
            &[1.0, 1.0, 1.0],
            1.0,
            MajoritySign::Frequency,
            &mut |_, _| unreachable!(),
        );
        // e1: signs +,-,+ -> + (frequency) though the total is negative
        assert_eq!(out, vec![1.0, 1.0]);
    }

    #[test]
    fn magnitude_prune_keeps_int_density_n() {
        let mut t = vec![vec![0.1, -0.4, 0.3, 0.2, -0.05]];
        // int(0.5 * 5) = 2: keeps -0.4 and 0.3
        let out = combine(
            Combine::Magnitude,
            &mut t,
            &[2.0],
            0.5,
            MajoritySign::Total,
            &mut |_, _| unreachable!(),
        );
        assert_eq!(out, vec![0.0, -0.8, 0.6, 0.0, 0.0]);
    }
}
