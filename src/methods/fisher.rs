//! `fisher` — Fisher-weighted averaging (Matena & Raffel 2022; docs/ALGORITHMS.md §18.1), as
//! fusion_bench's `merging_with_fisher_weights` computes it.
//!
//! Each model brings its diagonal Fisher F_i (same tensor names and shapes) in
//! `fisher.safetensors` beside its weights; the plan adds them as inputs M..2M of every
//! tensor. With the scaling coefficients c_i (the models' `weight`, default 1/M), optionally
//! normalised by each model's whole-model Fisher norm g_i = ‖(‖F_i[p]‖₂)_p‖₂
//! (c_i ← c_i·h_i/Σh, h_i = 1/(g_i + 1e-6)):
//! θ = Σ c_i (F_i + floor) θ_i / Σ c_i (F_i + floor). Raw weights: no base model.

use super::{
    BasePolicy, Ctx, Default, EachJob, Kind, Method, MethodInfo, ParamSpec, Params, Scope, SideInput,
};
use crate::backend::{Backend, Segments, Vector};
use crate::error::Result;

/// The file each model's diagonal Fisher is read from, in the model's folder.
pub const FISHER_FILE: &str = "fisher.safetensors";

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "fisher",
        pretty: "Fisher merging",
        reference: "https://arxiv.org/abs/2111.09832",
        summary: "Per-element average of the models weighted by their diagonal Fisher information (each model's `fisher.safetensors`).",
        params: vec![
            ParamSpec {
                name: "weight",
                kind: Kind::Float,
                scope: Scope::NonBase,
                default: Default::Unset,
                help: "scaling coefficient of this model (unset: 1/number of models)",
            },
            ParamSpec {
                name: "normalize_fisher_weight",
                kind: Kind::Bool,
                scope: Scope::Shared,
                default: Default::Bool(true),
                help: "divide each model's coefficient by its Fisher's whole-model L2 norm (then renormalise)",
            },
            ParamSpec {
                name: "minimal_fisher_weight",
                kind: Kind::Float,
                scope: Scope::Shared,
                default: Default::Float(1e-6),
                help: "added to every Fisher value (the floor where a model has no information)",
            },
        ],
        base: BasePolicy::Ignored,
        models: (1, None),
        imp: Box::new(Fisher),
    }]
}

/// Σ_p ‖F_i[p]‖² per model i, over every merged tensor.
pub fn globals(b: &dyn Backend, each: &super::EachJob) -> Result<Vec<f64>> {
    let mut acc: Vec<f64> = Vec::new();
    each(&mut |job, params, _| {
        let m = params.per_input.len();
        let vecs: Vec<Vector> = (0..m).map(|i| Vector::Model(m + i)).collect();
        let pairs: Vec<(usize, usize)> = (0..m).map(|i| (i, i)).collect();
        let d = b.dots(job, &vecs, &pairs, Segments::Whole)?;
        acc.resize(d.len(), 0.0);
        acc.iter_mut().zip(&d).for_each(|(a, x)| *a += x);
        Ok(())
    })?;
    Ok(acc)
}

fn coefficients(params: &Params) -> Vec<f64> {
    let m = params.per_input.len();
    (0..m)
        .map(|i| params.input_f(i, "weight").unwrap_or(1.0 / m as f64))
        .collect()
}

pub fn check(params: &Params) -> std::result::Result<(), String> {
    let c = coefficients(params);
    if let Some((i, w)) = c.iter().enumerate().find(|(_, w)| **w < 0.0) {
        return Err(format!(
            "weight {w} of input {i} is negative; Fisher merging needs coefficients ≥ 0"
        ));
    }
    if c.iter().all(|w| *w == 0.0) {
        return Err("every weight is 0; Fisher merging would divide by 0".into());
    }
    let floor = params.shared_f("minimal_fisher_weight");
    if floor < 0.0 {
        return Err(format!(
            "minimal_fisher_weight {floor} is negative; it must be ≥ 0 (default 1e-6)"
        ));
    }
    Ok(())
}

pub fn run(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let mut c = coefficients(cx.params);
    let m = c.len();
    if cx.params.shared_b("normalize_fisher_weight") {
        if cx.globals.len() != m {
            return Err(cx.err(
                "the whole-model Fisher norms were not computed (merge through a plan)".into(),
            ));
        }
        let h: Vec<f64> = cx.globals.iter().map(|s| 1.0 / (s.sqrt() + 1e-6)).collect();
        let hs: f64 = h.iter().sum();
        c.iter_mut().zip(&h).for_each(|(c, h)| *c *= h / hs);
    }
    let c: Vec<f32> = c.iter().map(|x| *x as f32).collect();
    let floor = cx.params.shared_f("minimal_fisher_weight") as f32;
    b.fisher(cx.job, &c, floor, out)
}

#[derive(Debug)]
struct Fisher;

impl Method for Fisher {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        run(b, cx, out)
    }
    fn check(&self, params: &Params) -> std::result::Result<(), String> {
        check(params)
    }
    fn side_input(&self) -> Option<SideInput> {
        Some(SideInput {
            file: FISHER_FILE,
            what: "Fisher",
            why: "fisher merging reads each model's diagonal Fisher (same tensor names and shapes as its weights) from that file",
        })
    }
    fn wants_globals(&self, _params: &Params) -> bool {
        true
    }
    fn whole_model(
        &self,
        b: &dyn Backend,
        each: &EachJob,
        _seed: u64,
        _prior: Option<&serde_json::Value>,
    ) -> Result<Vec<f64>> {
        globals(b, each)
    }
}
