//! `smelt continual`: fold one more fine-tuned model into an OPCM merge.

use std::path::PathBuf;

use smelt::dtype::DType;

use super::args::{DeviceArgs, ShardSize};
use super::execute::{execute_fresh, print_linalg};

#[derive(clap::Args)]
pub struct ContinualArgs {
    /// An OPCM merge (with opcm-state.json), or a first fine-tuned model (with --base).
    pub merged: PathBuf,
    /// The fine-tuned model to fold in (a folder or Hub id org/name[@revision]).
    pub new: PathBuf,
    /// Output folder (refused if it exists, unless --force).
    #[arg(short, long)]
    pub out: PathBuf,
    /// The base model (default: the one the state file records).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Share of the merged task vector's singular value mass whose subspace NEW may not
    /// write into (default: the state's; 0.5 without one).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// The output's dtype: bf16, f16 or f32 (also bfloat16, float16, float32), as a recipe's
    /// `out_dtype`; the computation stays f32. Default: the inputs' dtype.
    #[arg(long, value_name = "DTYPE", value_parser = parse_out_dtype)]
    pub out_dtype: Option<DType>,
    /// Largest shard to write, e.g. 5GB, 500MB, 2GiB (a bare `B` is mergekit's billion: 5B = 5e9 bytes).
    #[arg(long, default_value = "5GB")]
    pub out_shard_size: ShardSize,
    /// Replace OUT if it is an earlier smelt output or an empty folder (the old folder is
    /// removed only after the new one is complete). Any other folder is refused.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: ContinualArgs) -> anyhow::Result<()> {
    let ContinualArgs {
        merged,
        new,
        out,
        base,
        alpha,
        out_dtype,
        out_shard_size,
        force,
        device,
    } = args;
    let merged_dir = smelt::hub::resolve_arg(&merged, "the merged model")?;
    let new_dir = smelt::hub::resolve_arg(&new, "the new model")?;
    let base_dir = base
        .as_deref()
        .map(|b| smelt::hub::resolve_arg(b, "--base"))
        .transpose()?;
    let plan = smelt::workflows::continual::continual_plan(
        &merged_dir,
        &new_dir,
        base_dir.as_deref(),
        alpha,
        out_dtype,
    )?;
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    let report = execute_fresh(&plan, &device, out, force, out_shard_size.get())?;
    let (state, _) =
        smelt::methods::opcm::read_state(&report.out_dir.join(smelt::methods::opcm::STATE_NAME))?;
    let n = state["models"].as_array().map_or(0, |m| m.len());
    println!(
        "folded {} into {}: {} models merged so far, next λ {:.6}, task-vector norms {}; {} tensors in {:.2} s on {}",
        new.display(),
        report.out_dir.display(),
        n,
        state["lambda"].as_f64().unwrap_or(f64::NAN),
        state["norms"],
        report.tensors,
        report.seconds,
        report.backend
    );
    print_linalg(&report);
    Ok(())
}

/// `--out-dtype`: the names a recipe's `out_dtype` takes.
fn parse_out_dtype(s: &str) -> Result<DType, String> {
    DType::from_recipe_name(s).ok_or_else(|| {
        format!("unknown dtype `{s}`; valid: bf16, f16, f32 (or bfloat16, float16, float32)")
    })
}
