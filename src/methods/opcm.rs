//! `opcm` — continual merging by orthogonal projection (Tang et al. 2025, arXiv 2501.09522;
//! docs/ALGORITHMS.md §13), as fusion_bench's `opcm_general.OPCM` computes it, models folded in
//! recipe order.
//!
//! The merge starts as the first model (λ = 1). Folding in model t: each linear weight
//! (every 2-D tensor but input embeddings) adds the part of its task vector τ_t outside the
//! merged task vector's leading singular subspace — with τm = U diag(σ) Vᵀ and r the first
//! index where cumsum(σ)/Σσ exceeds `alpha`, P = Uᵀ τ_t V loses its diagonal and its r × r
//! top-left block, and W = W0 + λ·τm + U P Vᵀ; other tensors add τ_t. Then the merged task
//! vector is rescaled to the mean of the task-vector norms so far (whole-model L2 norms) and
//! λ becomes the ratio it was rescaled by. Only the first min(m, n) singular vectors meet the
//! zeroed entries, so U P Vᵀ = τ_t − U_k P_Z V_kᵀ with the thin SVD.
//!
//! The whole-model norms of each step come from passes over the model before the merge;
//! each pass refolds every tensor from its first model, so memory stays that of one tensor
//! (and one model at a time) however many models are merged, at T²/2 folds per tensor.

use super::dense::{is_input_embedding, mat, vectors, write_base_plus};
use super::{
    BasePolicy, Ctx, Default, EachJob, Finish, Kind, Method, MethodInfo, ParamSpec, Params, Scope,
    WeightFile,
};
use crate::backend::{Backend, Job, Segments, Vector};
use crate::error::{Error, Result};
use crate::linalg::Mat;

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "opcm",
        pretty: "OPCM (continual merging by orthogonal projection)",
        reference: "https://arxiv.org/abs/2501.09522",
        summary: "Fold the models in one at a time (recipe order): each linear weight adds only what lies outside the merged task vector's leading singular subspace, then the merge is rescaled to the mean task-vector norm.",
        params: vec![ParamSpec {
            name: "alpha",
            kind: Kind::Float,
            scope: Scope::Shared,
            default: Default::Float(0.5),
            help: "share of the merged task vector's singular value mass whose subspace new models may not write into",
        }],
        base: BasePolicy::Required,
        models: (1, None),
        imp: Box::new(Opcm),
    }]
}

fn check(params: &Params) -> std::result::Result<(), String> {
    let a = params.shared_f("alpha");
    if !(0.0..=1.0).contains(&a) {
        return Err(format!("alpha {a} is not a fraction in [0, 1]"));
    }
    Ok(())
}

fn delta(b: &dyn Backend, job: &Job, i: usize) -> Result<Vec<f32>> {
    Ok(vectors(b, job, &[Vector::Delta(i)], &[1.0])?.pop().unwrap())
}

/// The linear update λ·τm + τn − U_k P_Z V_kᵀ.
fn project(b: &dyn Backend, tm: &Mat, tn: &Mat, lambda: f32, alpha: f64) -> Result<Vec<f32>> {
    let d = b.svd(tm, None)?;
    let k = d.s.len();
    let total: f64 = d.s.iter().map(|x| *x as f64).sum();
    let mut cum = 0.0;
    let mut r = 0;
    for (j, s) in d.s.iter().enumerate() {
        cum += *s as f64;
        // torch: argmax(cumsum/sum > alpha), 0 when none exceeds it (or the sum is 0)
        if total > 0.0 && cum / total > alpha {
            r = j;
            break;
        }
    }
    let p = b.matmul(&b.matmul(&d.u, tn, true, false)?, &d.vt, false, true)?;
    let mut pz = Mat::zeros(k, k);
    for j in 0..k {
        for l in 0..k {
            if j == l || (j < r && l < r) {
                pz.data[j * k + l] = p.at(j, l);
            }
        }
    }
    let corr = b.matmul(&b.matmul(&d.u, &pz, false, false)?, &d.vt, false, false)?;
    Ok((0..tm.data.len())
        .map(|e| lambda * tm.data[e] + (tn.data[e] - corr.data[e]))
        .collect())
}

/// The merged task vector of one tensor after folding models 1..=upto into model 0:
/// step t uses λ `lambdas[t − 1]` and is rescaled by `scales[t − 1]` when that is known.
fn fold(
    b: &dyn Backend,
    job: &Job,
    shape: &[usize],
    alpha: f64,
    lambdas: &[f32],
    scales: &[f32],
    upto: usize,
) -> Result<Vec<f32>> {
    let linear = shape.len() == 2 && !is_input_embedding(job.name);
    let mut tm = delta(b, job, 0)?;
    for t in 1..=upto {
        let tn = delta(b, job, t)?;
        let lambda = lambdas[t - 1];
        let mut new = if linear {
            let (rows, cols) = (shape[0], shape[1]);
            project(b, &mat(rows, cols, tm), &mat(rows, cols, tn), lambda, alpha)?
        } else {
            tm.iter().zip(&tn).map(|(m, n)| lambda * m + n).collect()
        };
        if let Some(s) = scales.get(t - 1) {
            new.iter_mut().for_each(|x| *x *= s);
        }
        tm = new;
    }
    Ok(tm)
}

/// Where an earlier OPCM merge left off (its state file): the merge being continued is the
/// plan's first model, and the task-vector norms and λ come from here instead of from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Prior {
    /// ‖τ‖ of every model folded in so far.
    pub norms: Vec<f64>,
    /// λ for the next fold.
    pub lambda: f64,
}

/// `[λ used at step 1.., T − 1 of them, the rescale of step 1.., T − 1, λ for a next
/// step, then ‖τ‖ of every model folded in (prior ones first)]`. With a `prior`, model 0
/// is an earlier merge: its norm is not a task-vector norm, and step 1 uses the prior's λ.
fn globals(b: &dyn Backend, each: &EachJob, prior: Option<&Prior>) -> Result<Vec<f64>> {
    let mut norm2: Vec<f64> = Vec::new();
    each(&mut |job, _, _| {
        let m = job.models.len();
        let vecs: Vec<Vector> = (0..m).map(Vector::Delta).collect();
        let pairs: Vec<(usize, usize)> = (0..m).map(|i| (i, i)).collect();
        let d = b.dots(job, &vecs, &pairs, Segments::Whole)?;
        norm2.resize(m, 0.0);
        norm2.iter_mut().zip(&d).for_each(|(a, x)| *a += x);
        Ok(())
    })?;
    let t_models = norm2.len();
    let mut norms: Vec<f64> = norm2.iter().map(|x| x.sqrt()).collect();
    // the norms so far, before model t's: a prior's list stands for model 0
    let earlier = prior
        .map(|p| p.norms.clone())
        .unwrap_or_else(|| vec![norms[0]]);
    let mut lambdas = vec![prior.map_or(1.0, |p| p.lambda as f32)];
    let mut scales: Vec<f32> = Vec::new();
    for t in 1..t_models {
        let mut n2 = 0.0f64;
        each(&mut |job, params, shape| {
            let v = fold(
                b,
                job,
                shape,
                params.shared_f("alpha"),
                &lambdas,
                &scales,
                t,
            )?;
            n2 += v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>();
            Ok(())
        })?;
        let so_far = earlier.len() + t;
        let mean = (earlier.iter().sum::<f64>() + norms[1..=t].iter().sum::<f64>()) / so_far as f64;
        let n = n2.sqrt();
        if n == 0.0 {
            return Err(Error::Param {
                tensor: "(whole model)".into(),
                msg: format!("after folding in model {t} the merged task vector is zero; OPCM cannot rescale it"),
            });
        }
        lambdas.push((n / mean) as f32);
        scales.push((mean / n) as f32);
    }
    let next = lambdas.pop().unwrap_or(1.0);
    let mut g: Vec<f64> = lambdas.iter().map(|x| *x as f64).collect();
    g.extend(scales.iter().map(|x| *x as f64));
    g.push(next as f64);
    let mut all = earlier;
    all.extend(norms.drain(1..));
    g.extend(all);
    Ok(g)
}

/// The state file an OPCM merge leaves in its output, for `smelt continual`.
pub const STATE_NAME: &str = "opcm-state.json";
pub const STATE_FORMAT: &str = "smelt-opcm-state";
/// Version 2 records the weights the state belongs to (`weights`) and requires every model
/// folded in, and the base, to be recorded with its path and digest. Version 1 had neither.
pub const STATE_VERSION: u64 = 2;

/// What ties a state to the weights beside it: SHA-256 over one line per weight file,
/// `NAME<TAB>BYTES<TAB>KIND:HASH<LF>` in name order, where KIND:HASH is the file's hash as the
/// output's `smelt-manifest.json` records it (`blake3` by default). The weight files are the
/// `.safetensors` shards and, with several, `model.safetensors.index.json`. The manifest
/// itself lists the state file, so the state cannot hold the manifest's own digest.
pub fn weights_digest(files: &[WeightFile]) -> String {
    use sha2::Digest;
    let mut sorted: Vec<&WeightFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = sha2::Sha256::new();
    for f in sorted {
        h.update(format!("{}\t{}\t{}:{}\n", f.name, f.bytes, f.algo, f.hash).as_bytes());
    }
    crate::io::writer::hex(&h.finalize())
}

/// Whether a file of a model folder is one of its weight files ([`weights_digest`]).
pub fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name == crate::io::model::INDEX_NAME
}

/// The state after a merge whose whole-model statistics are `globals` (see [`globals`]),
/// with `steps` folds, written beside the weight files `weights`.
pub fn state(
    globals: &[f64],
    steps: usize,
    alpha: f64,
    weights: &[WeightFile],
    base: serde_json::Value,
    models: Vec<serde_json::Value>,
) -> serde_json::Value {
    let rest = &globals[2 * steps..];
    let names: Vec<&str> = weights.iter().map(|w| w.name.as_str()).collect();
    serde_json::json!({
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "method": "opcm (Tang et al. 2025, arXiv 2501.09522)",
        "alpha": alpha,
        "lambda": rest[0],
        "norms": &rest[1..],
        "weights": {"digest": weights_digest(weights), "files": names},
        "base": base,
        "models": models,
    })
}

/// What a state file holds, read and checked: the prior, alpha, the digest of the weights
/// it belongs to ([`weights_digest`]), the base entry and the models folded so far (each
/// entry a `{path, label, digest}` object, in the order they were folded in).
pub struct State {
    pub prior: Prior,
    pub alpha: f64,
    pub weights: String,
    pub base: serde_json::Value,
    pub models: Vec<serde_json::Value>,
}

/// Reads a state file and checks it ([`parse_state`]); returns it as it is (for
/// [`crate::plan::Plan::prior`]) and its parts.
pub fn read_state(path: &std::path::Path) -> Result<(serde_json::Value, State)> {
    let text =
        crate::io::read::read_string_capped(path, crate::io::read::STATE_CAP, "OPCM state")?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadModel {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let state = parse_state(&v).map_err(|msg| Error::BadModel {
        path: path.to_path_buf(),
        msg,
    })?;
    Ok((v, state))
}

/// The parts of a state file's JSON; the message says what is wrong with it.
pub fn parse_state(v: &serde_json::Value) -> std::result::Result<State, String> {
    if v["format"] == STATE_FORMAT && v["version"] == 1 {
        return Err("a version 1 state from an earlier smelt: it does not record the weights it belongs to (`weights`), so it cannot be checked against this folder; redo the merge with this smelt (`smelt merge` of the OPCM recipe with every model so far, or `smelt continual FIRST SECOND --base BASE` and fold the others in again)".into());
    }
    if v["format"] != STATE_FORMAT || v["version"] != STATE_VERSION {
        return Err(format!(
            "not a {STATE_FORMAT} version {STATE_VERSION} file (format {}, version {})",
            v["format"], v["version"]
        ));
    }
    let num = |k: &str| {
        v[k].as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("`{k}` is not a number"))
    };
    let lambda = num("lambda")?;
    let alpha = num("alpha")?;
    let norms: Vec<f64> = v["norms"]
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| "`norms` is not a non-empty list".to_string())?
        .iter()
        .map(|x| x.as_f64().filter(|x| x.is_finite() && *x >= 0.0))
        .collect::<Option<_>>()
        .ok_or_else(|| "`norms` holds something other than non-negative numbers".to_string())?;
    if lambda <= 0.0 {
        return Err(format!("`lambda` {lambda} is not positive"));
    }
    let weights = v["weights"]["digest"]
        .as_str()
        .filter(|d| d.len() == 64 && d.bytes().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| {
            "`weights.digest` (the digest of the weights the state belongs to) is missing or not a SHA-256 hex digest".to_string()
        })?
        .to_string();
    let recorded = |e: &serde_json::Value| e["path"].is_string() && e["digest"].is_string();
    if !recorded(&v["base"]) {
        return Err("`base` does not record the base model's `path` and `digest`".into());
    }
    let models = v["models"]
        .as_array()
        .cloned()
        .ok_or_else(|| "`models` is not a list".to_string())?;
    if let Some(i) = models.iter().position(|m| !recorded(m)) {
        return Err(format!(
            "`models[{i}]` does not record the model's `path` and `digest`"
        ));
    }
    if models.len() != norms.len() {
        return Err(format!(
            "`models` lists {} models but `norms` holds {} norms; each model folded in has one",
            models.len(),
            norms.len()
        ));
    }
    Ok(State {
        prior: Prior { norms, lambda },
        alpha,
        weights,
        base: v["base"].clone(),
        models,
    })
}

fn run(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let steps = cx.job.models.len() - 1;
    if cx.globals.len() < 2 * steps + 2 {
        return Err(
            cx.err("OPCM's whole-model norms were not computed (merge through a plan)".into())
        );
    }
    let lambdas: Vec<f32> = cx.globals[..steps].iter().map(|x| *x as f32).collect();
    let scales: Vec<f32> = cx.globals[steps..].iter().map(|x| *x as f32).collect();
    let tau = fold(
        b,
        cx.job,
        cx.shape,
        cx.params.shared_f("alpha"),
        &lambdas,
        &scales,
        steps,
    )?;
    write_base_plus(b, cx.job, &tau, out)
}

#[derive(Debug)]
struct Opcm;

impl Method for Opcm {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        run(b, cx, out)
    }
    fn check(&self, params: &Params) -> std::result::Result<(), String> {
        check(params)
    }
    fn wants_globals(&self, _params: &Params) -> bool {
        true
    }
    fn whole_model(
        &self,
        b: &dyn Backend,
        each: &EachJob,
        _seed: u64,
        prior: Option<&serde_json::Value>,
    ) -> Result<Vec<f64>> {
        let prior = prior
            .map(parse_state)
            .transpose()
            .map_err(|msg| Error::Param {
                tensor: "(whole model)".into(),
                msg: format!("the state of the merge continued from: {msg}"),
            })?
            .map(|s| s.prior);
        globals(b, each, prior.as_ref())
    }
    /// The state file for `smelt continual`: λ and the norms from the whole-model
    /// statistics, the base and every model folded in so far.
    fn finish(&self, cx: &Finish) -> Result<Option<(&'static str, Vec<u8>)>> {
        let (base, merged) = (cx.inputs)();
        let steps = merged.len().saturating_sub(1);
        let models = match cx.prior {
            // the merge continued is model 0; the state lists what it folded in
            Some(p) => {
                let mut m = p["models"].as_array().cloned().unwrap_or_default();
                m.extend(merged[1..].iter().cloned());
                m
            }
            None => merged,
        };
        let alpha = cx.params.map(|p| p.shared_f("alpha")).unwrap_or(0.5);
        let base = base.unwrap_or(serde_json::Value::Null);
        let v = state(cx.globals, steps, alpha, cx.weights, base, models);
        Ok(Some((
            STATE_NAME,
            (serde_json::to_string_pretty(&v).unwrap() + "\n").into_bytes(),
        )))
    }
}
