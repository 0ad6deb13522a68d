//! The merge methods. Each is one file: a type implementing [`Method`] (its math, written
//! once against the [`Backend`] primitives, and whatever hooks it needs) and a `methods()`
//! function describing it ([`MethodInfo`]: name, help, parameters, base policy). The
//! `registry!` line below names every such file; the recipe parser, the planner, the
//! executor, `smelt methods`, `smelt bench` and the registry-driven tests read that one
//! list, so a new method is one new file plus one line there.

mod dense;
pub mod params;

pub use fisher::FISHER_FILE;
pub use gta::della_table;
pub use params::{Default, Kind, ParamSpec, Params, Scope, Value1};

use crate::backend::{Backend, Job};
use crate::error::{Error, Result};

/// Declares the method modules and lists what each describes, in this order.
macro_rules! registry {
    ($($vis:vis $module:ident),* $(,)?) => {
        $($vis mod $module;)*

        /// Every method smelt has, in the order `smelt methods` lists them.
        fn registry() -> &'static [MethodInfo] {
            static R: std::sync::OnceLock<Vec<MethodInfo>> = std::sync::OnceLock::new();
            R.get_or_init(|| {
                let mut v = Vec::new();
                $(v.extend($module::methods());)*
                v
            })
        }
    };
}

// One line per method file: `methods()` in each describes its methods.
registry! {
    linear,
    passthrough,
    gta,
    sce,
    model_stock,
    sphere,
    nearswap,
    tsvm,
    fisher,
    widen,
    pcb,
    pub opcm,
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

/// A method as the rest of smelt sees it: what it is called and takes (for recipes, `smelt
/// methods` and the planner) and its implementation.
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
    /// The math and the hooks.
    pub imp: Box<dyn Method>,
}

impl MethodInfo {
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Inputs a tensor of the method reads per merged model: its weights, and the tensor of
    /// the same name in the model's side file when the method has one.
    pub fn inputs_per_model(&self) -> usize {
        1 + self.imp.side_input().is_some() as usize
    }
}

/// A file every merged model brings beside its weights, read as extra inputs of every tensor
/// (Fisher merging's diagonal Fisher): with M merged models, input M + i of a tensor is the
/// tensor of the same name and shape in model i's side file.
#[derive(Clone, Copy, Debug)]
pub struct SideInput {
    /// The file's name in each model's folder.
    pub file: &'static str,
    /// What it holds, as messages name it ("Fisher").
    pub what: &'static str,
    /// Why the method needs it, for the message when a model lacks it.
    pub why: &'static str,
}

/// What a method's finish step knows of the merge it ends: for methods that leave a state
/// file for a later continuation.
pub struct Finish<'a> {
    /// The whole-model statistics ([`Method::whole_model`]).
    pub globals: &'a [f64],
    /// The parameters of the first merged tensor (None when every tensor was copied).
    pub params: Option<&'a Params>,
    /// The base model and the merged models as `{path, label, digest}` records, in order
    /// (made on call: the digests read samples of every input file).
    pub inputs: &'a dyn Fn() -> (Option<serde_json::Value>, Vec<serde_json::Value>),
    /// The state the merge continued from, if it did ([`crate::plan::Plan::prior`]).
    pub prior: Option<&'a serde_json::Value>,
    /// The weight files just written (shards, and the index when there are several), as the
    /// output's manifest will list them: what a state file records it belongs to.
    pub weights: &'a [WeightFile],
}

/// A weight file of an output as its manifest (`smelt-manifest.json`) lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightFile {
    pub name: String,
    pub bytes: u64,
    /// The manifest's hash kind (`blake3` or `sha256`) and the file's hash in it, hex.
    pub algo: String,
    pub hash: String,
}

/// One merge method. Only [`Method::run`] is required; the other hooks have defaults that
/// fit a method that merges each tensor on its own.
pub trait Method: std::fmt::Debug + Send + Sync {
    /// Merges one output tensor, writing `cx.job.out_dtype` bytes into `out`.
    fn run(&self, backend: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()>;

    /// Checks a tensor's resolved parameters (at plan time, so that a merge that would fail
    /// on its last tensor fails before the first); the message names the problem.
    fn check(&self, _params: &Params) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Elements that must stay together in one GPU tile (rows the method ranks within).
    fn align(&self, _params: &Params, _shape: &[usize]) -> usize {
        1
    }

    /// A file each merged model brings beside its weights ([`SideInput`]).
    fn side_input(&self) -> Option<SideInput> {
        None
    }

    /// Does a tensor with these parameters take part in [`Method::whole_model`]'s passes?
    /// (The executor skips the others, and skips the passes when no tensor does.)
    fn wants_globals(&self, _params: &Params) -> bool {
        false
    }

    /// Statistics of the whole model the method needs before it merges any tensor (Fisher
    /// norms, PCB's order statistics, OPCM's norms), computed on the backend in passes over
    /// every merged tensor; they reach [`Method::run`] as [`Ctx::globals`]. `prior` is the
    /// state an earlier merge left, when this one continues it.
    fn whole_model(
        &self,
        _backend: &dyn Backend,
        _each: &EachJob,
        _seed: u64,
        _prior: Option<&serde_json::Value>,
    ) -> Result<Vec<f64>> {
        Ok(Vec::new())
    }

    /// Whether [`Method::run`] goes through the backend's `gta` or `weighted_sum` for every
    /// tensor, which check the inputs for NaN and infinity on the way on backends that
    /// [`Backend::scans_inputs`]: the executor then needs no scan of its own first.
    fn checks_inputs_on_the_way(&self) -> bool {
        false
    }

    /// A file to write into the output beside the weights once every tensor is merged (OPCM's
    /// state for `smelt continual`): its name and bytes.
    fn finish(&self, _cx: &Finish) -> Result<Option<(&'static str, Vec<u8>)>> {
        Ok(None)
    }
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

pub fn edit_distance(a: &str, b: &str) -> usize {
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
    /// The whole-model statistics of the method ([`Method::whole_model`]); empty for methods that
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

/// Checks a tensor's resolved parameters at plan time: every number finite, then the
/// method's own [`Method::check`].
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
    method.imp.check(params).or_else(err)
}

/// Calls its argument with the job of every merged tensor (inputs as planned, output
/// f32) and that tensor's parameters and shape.
pub type EachJob<'a> = dyn Fn(&mut JobVisitor) -> Result<()> + 'a;

/// What [`EachJob`] calls: a tensor's job, parameters and shape.
pub type JobVisitor<'a> = dyn FnMut(&Job, &Params, &[usize]) -> Result<()> + 'a;

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
