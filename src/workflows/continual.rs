//! `smelt continual`: fold one more model into an OPCM merge, continuing from the state file
//! that merge left (see [`crate::methods::opcm`]). A workflow above the methods: it builds
//! an ordinary plan of a two-model OPCM recipe and hands it the earlier merge's state.
//!
//! Before anything is merged the state is checked against what it continues: it must belong
//! to the weights beside it (the digest of their manifest entries, [`weights_digest`], with
//! every weight file re-hashed against the manifest), the base must be the one it records,
//! and the new model must be none of the models already folded in, nor the merge itself,
//! nor the base.

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::inputs::input_digest;
use crate::io::model::ModelFolder;
use crate::io::read::{read_string_capped, JSON_CAP};
use crate::io::verify::{EntryProblem, ManifestEntry, Mismatch};
use crate::io::writer::MANIFEST;
use crate::methods::opcm::{is_weight_file, read_state, weights_digest, State, STATE_NAME};
use crate::methods::WeightFile;
use crate::plan::Plan;
use crate::recipe::Recipe;

/// What to do when the state cannot continue: said at the end of each refusal.
const REDO: &str = "continue from the folder the OPCM merge wrote, or start again from a first model with --base (or merge all the models in one OPCM recipe)";

/// The plan of `smelt continual`: fold `new` into the OPCM merge `merged`, continuing from
/// the state file that merge left (λ, the task-vector norms, alpha, the base). Without a
/// state file `merged` is taken as a first model (a plain two-model OPCM merge), which
/// needs `base`. `alpha` overrides the state's; `out_dtype` is the output's dtype (the
/// recipe's `out_dtype`; by default the inputs').
pub fn continual_plan(
    merged: &Path,
    new: &Path,
    base: Option<&Path>,
    alpha: Option<f64>,
    out_dtype: Option<DType>,
) -> Result<Plan> {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let state_path = merged.join(STATE_NAME);
    let (raw, state) = if state_path.exists() || state_path.is_symlink() {
        let (raw, state) = read_state(&state_path)?;
        check_weights(merged, &state_path, &state)?;
        (Some(raw), Some(state))
    } else {
        (None, None)
    };
    let base_path = match (base, &state) {
        (Some(b), _) => b.to_path_buf(),
        (None, Some(s)) => match s.base["path"].as_str() {
            Some(p) => std::path::PathBuf::from(p),
            None => {
                return Err(Error::BadModel {
                    path: state_path.clone(),
                    msg: "the state names no base model; give --base".into(),
                })
            }
        },
        (None, None) => {
            return Err(Error::BadModel {
                path: merged.to_path_buf(),
                msg: format!(
                    "has no {STATE_NAME} (it is not the output of an OPCM merge); to start a continual merge from a single model, give --base"
                ),
            })
        }
    };
    if let Some(State { base: b, .. }) = &state {
        let folder = ModelFolder::open(&base_path, &base_path.display().to_string())?;
        let digest = folder.digest();
        if let Some(want) = b["digest"].as_str() {
            if want != digest {
                return Err(Error::BadModel {
                    path: base_path.clone(),
                    msg: format!(
                        "is not the base of {} (its digest is {digest}; the state file records {want} for {})",
                        merged.display(),
                        b["path"].as_str().unwrap_or("?")
                    ),
                });
            }
        }
    }
    // the same folder twice would be one model of the plan: refused by path first
    if abs(new) == abs(merged) {
        return Err(is_merged(new, merged));
    }
    if abs(new) == abs(&base_path) {
        return Err(is_base(new, &base_path));
    }
    if abs(merged) == abs(&base_path) {
        return Err(Error::BadModel {
            path: merged.to_path_buf(),
            msg: "is the base model itself; continual merging starts from a model fine-tuned from the base (or from an OPCM merge)".into(),
        });
    }
    let alpha = alpha.or(state.as_ref().map(|s| s.alpha)).unwrap_or(0.5);
    let q = |p: &Path| serde_json::to_string(&abs(p).display().to_string()).unwrap();
    let mut text = format!(
        "merge_method: opcm\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  alpha: {alpha:?}\n",
        q(&base_path),
        q(merged),
        q(new)
    );
    if let Some(dt) = out_dtype {
        text += &format!("out_dtype: {}\n", dt.torch_name());
    }
    let recipe = Recipe::parse(&text, &abs(merged).join("continual.yml"))?;
    let mut plan = Plan::build(recipe, None)?;
    check_new_model(&plan, merged, new, &base_path, state.as_ref())?;
    plan.prior = raw;
    Ok(plan)
}

fn is_merged(new: &Path, merged: &Path) -> Error {
    Error::BadModel {
        path: new.to_path_buf(),
        msg: format!(
            "is the same model as {}, which it would be folded into (the same weights); give a fine-tuned model that is not yet part of the merge",
            merged.display()
        ),
    }
}

fn is_base(new: &Path, base: &Path) -> Error {
    Error::BadModel {
        path: new.to_path_buf(),
        msg: format!(
            "is the base model of this merge ({}: the same weights), whose task vector is zero; give a model fine-tuned from it",
            base.display()
        ),
    }
}

/// Refuses a new model that is the merge itself, the base, or a model already folded in
/// (compared by the digests the state records, which are the plan's input digests).
fn check_new_model(
    plan: &Plan,
    merged: &Path,
    new: &Path,
    base: &Path,
    state: Option<&State>,
) -> Result<()> {
    // the non-base models in recipe order: the merge, then the new model (as exec records them)
    let merged_models: Vec<usize> = (0..plan.models.len())
        .filter(|&i| Some(i) != plan.base)
        .collect();
    let (Some(&mi), Some(&ni), Some(bi)) = (merged_models.first(), merged_models.get(1), plan.base)
    else {
        return Err(is_merged(new, merged));
    };
    let digest = input_digest(&plan.models[ni]);
    if digest == input_digest(&plan.models[mi]) {
        return Err(is_merged(new, merged));
    }
    if digest == input_digest(&plan.models[bi]) {
        return Err(is_base(new, base));
    }
    if let Some(s) = state {
        if let Some(k) = s
            .models
            .iter()
            .position(|m| m["digest"].as_str() == Some(digest.as_str()))
        {
            return Err(Error::BadModel {
                path: new.to_path_buf(),
                msg: format!(
                    "is already folded into {} (step {} of {}, recorded as {}; digest {digest}); folding it in again would count it twice: give a model not yet merged",
                    merged.display(),
                    k + 1,
                    s.models.len(),
                    s.models[k]["path"].as_str().unwrap_or("?"),
                ),
            });
        }
    }
    Ok(())
}

/// Checks that the state at `state_path` belongs to the weights of `merged`: each weight
/// file the folder's manifest lists still has the size and hash listed, no weight file lies
/// in the folder unlisted, and the digest of the entries ([`weights_digest`]) is the state's.
/// Every weight file is read once to re-hash it.
fn check_weights(merged: &Path, state_path: &Path, state: &State) -> Result<()> {
    let refuse = |msg: String| Error::BadModel {
        path: state_path.to_path_buf(),
        msg,
    };
    let mp = merged.join(MANIFEST);
    if !(mp.exists() || mp.is_symlink()) {
        return Err(refuse(format!(
            "sits in a folder without {MANIFEST}, so smelt cannot tell which weights it belongs to; it cannot continue this folder: {REDO}"
        )));
    }
    let damaged = |msg: String| Error::BadModel {
        path: mp.clone(),
        msg: format!("{msg}; the weights cannot be checked against {STATE_NAME}: {REDO}"),
    };
    let text = read_string_capped(&mp, JSON_CAP, "manifest")?;
    let manifest: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| damaged(format!("not valid JSON: {e}")))?;
    let listed = manifest["files"]
        .as_object()
        .ok_or_else(|| damaged("has no \"files\" object".into()))?;
    let mut files = Vec::new();
    for (name, entry) in listed.iter().filter(|(n, _)| is_weight_file(n)) {
        let e = ManifestEntry::parse(name, entry).map_err(|p| {
            damaged(match p {
                EntryProblem::NotPlainName => format!("lists `{name}`, not a plain file name"),
                EntryProblem::NoHash => {
                    format!("its entry for {name} lacks `bytes` or a blake3/sha256 hash")
                }
            })
        })?;
        let changed = |what: String| {
            Error::BadModel {
            path: merged.join(name),
            msg: format!(
                "{what}: it changed after the merge, and {STATE_NAME} describes the weights as they were merged, so it cannot continue this folder; restore the file, or {REDO}"
            ),
        }
        };
        match e.check(merged) {
            Ok(()) => {}
            Err(Mismatch::Missing(err)) => {
                return Err(changed(format!(
                    "listed in {MANIFEST} but unreadable ({err})"
                )))
            }
            Err(Mismatch::Size(len)) => {
                return Err(changed(format!(
                    "{len} bytes, where {MANIFEST} records {}",
                    e.bytes
                )))
            }
            Err(Mismatch::Hash(got)) => {
                return Err(changed(format!(
                    "its {} is {got}, where {MANIFEST} records {}",
                    e.algo.name(),
                    e.hash
                )))
            }
            Err(Mismatch::Unreadable(err)) => return Err(err),
        }
        files.push(WeightFile {
            name: e.name,
            bytes: e.bytes,
            algo: e.algo.name().into(),
            hash: e.hash,
        });
    }
    let entries = std::fs::read_dir(merged).map_err(|e| Error::BadModel {
        path: merged.to_path_buf(),
        msg: format!("cannot list the folder: {e}"),
    })?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if is_weight_file(&name) && !listed.contains_key(&name) {
            return Err(Error::BadModel {
                path: e.path(),
                msg: format!(
                    "is not in {MANIFEST} (added after the merge?), so the folder is not the one {STATE_NAME} was written with; move the file away, or {REDO}"
                ),
            });
        }
    }
    let digest = weights_digest(&files);
    if digest != state.weights {
        return Err(refuse(format!(
            "belongs to another merge (its weights digest {}, this folder's {digest}); it cannot continue this folder: {REDO}",
            state.weights
        )));
    }
    Ok(())
}
