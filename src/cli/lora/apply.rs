//! `smelt lora apply`: bake a LoRA adapter into its base model (PEFT's `merge_and_unload`).

use std::path::{Path, PathBuf};

use smelt::plan::Plan;
use smelt::recipe::Recipe;

use crate::cli::args::{DeviceArgs, ShardSize};
use crate::cli::execute::{execute_fresh, print_linalg};

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The base model folder (or Hub id org/name[@revision]).
    pub base: PathBuf,
    /// The PEFT LoRA adapter folder (or Hub id).
    pub adapter: PathBuf,
    /// Output folder (refused if it exists, unless --force).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Replace OUT if it is an earlier smelt output or an empty folder (the old folder is
    /// removed only after the new one is complete). Any other folder is refused.
    #[arg(long)]
    pub force: bool,
    /// Largest shard to write, e.g. 5GB, 500MB, 2GiB (a bare `B` is mergekit's billion: 5B = 5e9 bytes).
    #[arg(long, default_value = "5GB")]
    pub out_shard_size: ShardSize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: ApplyArgs) -> anyhow::Result<()> {
    let ApplyArgs {
        base,
        adapter,
        out,
        force,
        out_shard_size,
        device,
    } = args;
    // The equivalent recipe; it is also what the model card records.
    let model = format!("{}+{}", base.display(), adapter.display());
    let text = format!(
        "# smelt lora apply\nmerge_method: passthrough\nmodels:\n  - model: {}\n",
        serde_json::to_string(&model)?
    );
    let recipe = Recipe::parse(&text, Path::new("lora-apply.yml"))?;
    let plan = Plan::build(recipe, None)?;
    let report = execute_fresh(&plan, &device, out, force, out_shard_size.get())?;
    let ad = &plan.models[0].adapters[0].adapter;
    println!(
        "applied {} ({} LoRA modules, {} full tensors) to {}: wrote {} tensors to {} in {:.2} s on {}",
        adapter.display(),
        ad.modules.len(),
        ad.replaced_tensors().count(),
        base.display(),
        report.tensors,
        report.out_dir.display(),
        report.seconds,
        report.backend
    );
    print_linalg(&report);
    Ok(())
}
