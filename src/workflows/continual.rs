//! `smelt continual`: fold one more model into an OPCM merge, continuing from the state file
//! that merge left (see [`crate::methods::opcm`]). A workflow above the methods: it builds
//! an ordinary plan of a two-model OPCM recipe and hands it the earlier merge's state.

use crate::error::{Error, Result};
use crate::io::model::ModelFolder;
use crate::methods::opcm::{read_state, State, STATE_NAME};
use crate::plan::Plan;
use crate::recipe::Recipe;

/// The plan of `smelt continual`: fold `new` into the OPCM merge `merged`, continuing from
/// the state file that merge left (λ, the task-vector norms, alpha, the base). Without a
/// state file `merged` is taken as a first model (a plain two-model OPCM merge), which
/// needs `base`. `alpha` overrides the state's.
pub fn continual_plan(
    merged: &std::path::Path,
    new: &std::path::Path,
    base: Option<&std::path::Path>,
    alpha: Option<f64>,
) -> Result<Plan> {
    let abs = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let state_path = merged.join(STATE_NAME);
    let (raw, state) = if state_path.is_file() {
        let (raw, state) = read_state(&state_path)?;
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
    let alpha = alpha.or(state.as_ref().map(|s| s.alpha)).unwrap_or(0.5);
    let q = |p: &std::path::Path| serde_json::to_string(&abs(p).display().to_string()).unwrap();
    let text = format!(
        "merge_method: opcm\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  alpha: {alpha:?}\n",
        q(&base_path),
        q(merged),
        q(new)
    );
    let recipe = Recipe::parse(&text, &abs(merged).join("continual.yml"))?;
    let mut plan = Plan::build(recipe, None)?;
    plan.prior = raw;
    Ok(plan)
}
