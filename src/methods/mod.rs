//! The merge methods: their parameters (names, scopes, defaults, help) and their math,
//! written once against the [`Backend`] primitives.

mod dense;
mod fisher;
mod gta;
mod linear;
mod model_stock;
mod nearswap;
pub mod opcm;
mod passthrough;
mod pcb;
mod sce;
mod sphere;
mod tsvm;
mod widen;

pub use fisher::FISHER_FILE;
pub use gta::della_table;

use crate::backend::{Backend, Job};
use crate::error::{Error, Result};
use crate::recipe::{Kind, Value1};

/// Where a parameter is set and to which inputs it applies (mergekit's scopes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One value per output tensor (`parameters:` at the top or slice level).
    Shared,
    /// One value per input model, base included.
    Input,
    /// One value per input model other than the base.
    NonBase,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Default {
    Required,
    /// Optional with no value (the method then does without it).
    Unset,
    Float(f64),
    Bool(bool),
}

#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub default: Default,
    pub help: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasePolicy {
    /// A base model is required; the other inputs are merged as deltas against it.
    Required,
    /// With a base model the inputs are merged as deltas against it; without, as they are.
    Optional,
    /// The method has no notion of a base model.
    Ignored,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Linear,
    Passthrough,
    Gta(gta::Variant),
    Sce,
    ModelStock,
    Slerp,
    NuSlerp,
    MultiSlerp,
    Karcher,
    NearSwap,
    Tsv,
    Fisher,
    Widen,
    Pcb,
    Opcm,
}

#[derive(Debug)]
pub struct MethodInfo {
    pub name: &'static str,
    pub pretty: &'static str,
    pub reference: &'static str,
    pub summary: &'static str,
    pub params: Vec<ParamSpec>,
    pub base: BasePolicy,
    /// How many inputs besides the base a tensor may merge: (at least, at most).
    pub models: (usize, Option<usize>),
    pub algo: Algo,
}

impl MethodInfo {
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
}

const fn p(
    name: &'static str,
    kind: Kind,
    scope: Scope,
    default: Default,
    help: &'static str,
) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        scope,
        default,
        help,
    }
}

fn registry() -> &'static [MethodInfo] {
    static R: std::sync::OnceLock<Vec<MethodInfo>> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let mut v = vec![
            MethodInfo {
                name: "linear",
                pretty: "Linear (model soup)",
                reference: "https://arxiv.org/abs/2203.05482",
                summary: "Weighted average of the models: Σ wᵢ·θᵢ / Σ wᵢ.",
                params: vec![
                    p("weight", Kind::Float, Scope::Input, Default::Required, "weight of this model"),
                    p("normalize", Kind::Bool, Scope::Shared, Default::Bool(true), "divide by the sum of the weights"),
                ],
                base: BasePolicy::Ignored,
                models: (1, None),
                algo: Algo::Linear,
            },
            MethodInfo {
                name: "passthrough",
                pretty: "Passthrough (layer swapping)",
                reference: "https://arxiv.org/abs/2410.01335",
                summary: "Copies tensors from exactly one source per slice; with `slices:` it stacks or swaps layers.",
                params: vec![p("scale", Kind::Float, Scope::Input, Default::Unset, "multiply the copied tensor by this")],
                base: BasePolicy::Ignored,
                models: (1, Some(1)),
                algo: Algo::Passthrough,
            },
        ];
        v.extend(gta::methods());
        v.push(sce::method());
        v.push(model_stock::method());
        v.extend(sphere::methods());
        v.push(nearswap::method());
        v.push(tsvm::method());
        v.push(fisher::method());
        v.push(widen::method());
        v.push(pcb::method());
        v.push(opcm::method());
        v
    })
}

pub fn all() -> &'static [MethodInfo] {
    registry()
}

pub fn find(name: &str) -> Option<&'static MethodInfo> {
    registry().iter().find(|m| m.name == name)
}

/// A method name close to a misspelt one (`dare-ties` -> `dare_ties`).
pub fn suggest(name: &str) -> Option<&'static str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace(['-', ' '], "_");
    let n = norm(name);
    registry()
        .iter()
        .map(|m| (edit_distance(&n, m.name), m.name))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, m)| m)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != *cb) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A tensor's parameters after gradients, filters, precedence and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// By the method's shared parameters, in spec order.
    pub shared: Vec<(&'static str, Option<Value1>)>,
    /// Per merged input, in order (the base is not among them).
    pub per_input: Vec<Vec<(&'static str, Option<Value1>)>>,
}

impl Params {
    /// Every parameter of `method` at its default for `inputs` merged inputs, with `set`
    /// overriding by name (benchmarks and tests build parameters without a recipe).
    pub fn for_method(method: &MethodInfo, inputs: usize, set: &[(&str, Value1)]) -> Params {
        let value = |p: &ParamSpec| {
            set.iter()
                .find(|(n, _)| *n == p.name)
                .map(|(_, v)| *v)
                .or(match p.default {
                    Default::Float(x) => Some(Value1::Float(x)),
                    Default::Bool(b) => Some(Value1::Bool(b)),
                    Default::Required | Default::Unset => None,
                })
        };
        Params {
            shared: method
                .params
                .iter()
                .filter(|p| p.scope == Scope::Shared)
                .map(|p| (p.name, value(p)))
                .collect(),
            per_input: (0..inputs)
                .map(|_| {
                    method
                        .params
                        .iter()
                        .filter(|p| p.scope != Scope::Shared)
                        .map(|p| (p.name, value(p)))
                        .collect()
                })
                .collect(),
        }
    }

    pub fn shared_f(&self, name: &str) -> f64 {
        match self.shared.iter().find(|(n, _)| *n == name) {
            Some((_, Some(Value1::Float(x)))) => *x,
            other => panic!("shared float parameter {name} not resolved: {other:?}"),
        }
    }
    /// A shared float parameter that may be unset.
    pub fn shared_opt(&self, name: &str) -> Option<f64> {
        self.shared
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| match v {
                Some(Value1::Float(x)) => Some(*x),
                _ => None,
            })
    }
    pub fn shared_b(&self, name: &str) -> bool {
        match self.shared.iter().find(|(n, _)| *n == name) {
            Some((_, Some(Value1::Bool(x)))) => *x,
            other => panic!("shared bool parameter {name} not resolved: {other:?}"),
        }
    }
    /// Float parameter of model input `i` (index into `per_input`), if set.
    pub fn input_f(&self, i: usize, name: &str) -> Option<f64> {
        self.per_input[i]
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| match v {
                Some(Value1::Float(x)) => Some(*x),
                _ => None,
            })
    }
}

/// Everything a method needs for one tensor besides the backend.
pub struct Ctx<'a> {
    pub job: &'a Job<'a>,
    pub shape: &'a [usize],
    /// `per_input[i]` belongs to `job.models[i]`.
    pub params: &'a Params,
    pub seed: u64,
    /// Position of the tensor's output layer among all output layers, `layer / (L - 1)` in
    /// [0, 1] (0 for a one-layer model); None for tensors outside the layers (embeddings,
    /// final norm, heads). LiNeS scales by it.
    pub depth: Option<f64>,
    /// The whole-model statistics of the method ([`whole_model`]); empty for methods that
    /// need none.
    pub globals: &'a [f64],
}

impl Ctx<'_> {
    pub fn model_f(&self, model: usize, name: &str) -> Option<f64> {
        self.params.input_f(model, name)
    }

    pub fn err(&self, msg: String) -> Error {
        Error::Param {
            tensor: self.job.name.to_string(),
            msg,
        }
    }
}

/// Checks a tensor's resolved parameters at plan time, so that a merge that would fail on
/// its last tensor fails before the first.
pub fn check(method: &MethodInfo, params: &Params, tensor: &str) -> Result<()> {
    let err = |msg: String| {
        Err(Error::Param {
            tensor: tensor.to_string(),
            msg,
        })
    };
    for (i, p) in params.per_input.iter().enumerate() {
        for (name, v) in p {
            if let Some(Value1::Float(x)) = v {
                if !x.is_finite() {
                    return err(format!("parameter `{name}` of input {i} is {x}"));
                }
            }
        }
    }
    for (name, v) in &params.shared {
        if let Some(Value1::Float(x)) = v {
            if !x.is_finite() {
                return err(format!("parameter `{name}` is {x}"));
            }
        }
    }
    match method.algo {
        Algo::Linear => linear::check(params).or_else(err),
        Algo::Gta(v) => gta::check(v, params).or_else(err),
        Algo::Karcher => sphere::check_karcher(params).or_else(err),
        Algo::Fisher => fisher::check(params).or_else(err),
        Algo::Pcb => pcb::check(params).or_else(err),
        Algo::Opcm => opcm::check(params).or_else(err),
        _ => Ok(()),
    }
}

/// Inputs a tensor of the method reads per merged model: Fisher merging reads the model's
/// weights and its Fisher.
pub fn inputs_per_model(method: &MethodInfo) -> usize {
    match method.algo {
        Algo::Fisher => 2,
        _ => 1,
    }
}

/// Calls its argument with the job of every merged tensor (inputs as planned, output
/// f32) and that tensor's parameters and shape.
pub type EachJob<'a> = dyn Fn(&mut JobVisitor) -> Result<()> + 'a;

/// What [`EachJob`] calls: a tensor's job, parameters and shape.
pub type JobVisitor<'a> = dyn FnMut(&Job, &Params, &[usize]) -> Result<()> + 'a;

/// Statistics of the whole model a method needs before it merges any tensor (Fisher norms,
/// PCB's order statistics), computed on the backend in passes over every merged tensor;
/// empty for the per-tensor methods. They reach the method as [`Ctx::globals`].
pub fn whole_model(
    method: &MethodInfo,
    backend: &dyn Backend,
    each: &EachJob,
    seed: u64,
) -> Result<Vec<f64>> {
    match method.algo {
        Algo::Gta(v) => gta::globals(v, backend, each, seed),
        Algo::Fisher => fisher::globals(backend, each),
        Algo::Pcb => pcb::globals(backend, each),
        Algo::Opcm => opcm::globals(backend, each),
        _ => Ok(Vec::new()),
    }
}

/// Does a tensor with these parameters take part in [`whole_model`]'s passes? (The
/// executor skips the others, and skips the passes when no tensor does.)
pub fn wants_globals(method: &MethodInfo, params: &Params) -> bool {
    match method.algo {
        Algo::Fisher | Algo::Pcb | Algo::Opcm => true,
        Algo::Gta(v) => gta::lines_auto(v, params),
        _ => false,
    }
}

/// Elements that must stay together in one GPU tile for this method (rows it ranks within).
pub fn job_align(method: &MethodInfo, params: &Params, shape: &[usize]) -> usize {
    match method.algo {
        Algo::Gta(v) => gta::align(v, params, shape),
        Algo::ModelStock => model_stock::segments(params, shape).align(),
        Algo::NuSlerp => sphere::nuslerp_segments(params, shape).align(),
        Algo::Widen => widen::align(shape),
        _ => 1,
    }
}

/// Runs `method` for one output tensor, writing `job.out_dtype` bytes into `out`.
pub fn run(method: &MethodInfo, backend: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    match method.algo {
        Algo::Linear => linear::run(backend, cx, out),
        Algo::Passthrough => passthrough::run(backend, cx, out),
        Algo::Gta(v) => gta::run(v, backend, cx, out),
        Algo::Sce => sce::run(backend, cx, out),
        Algo::ModelStock => model_stock::run(backend, cx, out),
        Algo::Slerp => sphere::slerp(backend, cx, out),
        Algo::NuSlerp => sphere::nuslerp(backend, cx, out),
        Algo::MultiSlerp => sphere::multislerp(backend, cx, out),
        Algo::Karcher => sphere::karcher(backend, cx, out),
        Algo::NearSwap => nearswap::run(backend, cx, out),
        Algo::Tsv => tsvm::run(backend, cx, out),
        Algo::Fisher => fisher::run(backend, cx, out),
        Algo::Widen => widen::run(backend, cx, out),
        Algo::Pcb => pcb::run(backend, cx, out),
        Algo::Opcm => opcm::run(backend, cx, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(suggest("dare-ties"), Some("dare_ties"));
        assert_eq!(suggest("Ties"), Some("ties"));
        assert_eq!(suggest("tie"), Some("ties"));
        assert_eq!(suggest("frobnicate"), None);
    }

    #[test]
    fn every_method_has_unique_params_with_help() {
        for m in all() {
            let mut names: Vec<_> = m.params.iter().map(|p| p.name).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), m.params.len(), "{}", m.name);
            assert!(m.params.iter().all(|p| !p.help.is_empty()));
        }
    }
}
