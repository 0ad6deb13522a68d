//! `smelt lora extract`: a LoRA adapter from a fine-tune, by truncated SVD of each change.

use std::path::PathBuf;

use smelt::io::guard::{claim_output, Protected};
use smelt::io::model::ModelFolder;
use smelt::io::writer::Start;

use crate::cli::args::{make_backend, DeviceArgs};

#[derive(clap::Args)]
pub struct ExtractArgs {
    /// The base model folder (or Hub id org/name[@revision]).
    pub base: PathBuf,
    /// The fine-tuned model folder or Hub id (same architecture and shapes).
    pub tuned: PathBuf,
    /// Rank of the adapter.
    #[arg(long)]
    pub rank: usize,
    /// Output adapter folder (refused if it exists, unless --force).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Replace OUT if it is an earlier smelt output or an empty folder (the old folder is
    /// removed only after the new one is complete). Any other folder is refused.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: ExtractArgs) -> anyhow::Result<()> {
    let ExtractArgs {
        base,
        tuned,
        rank,
        out,
        force,
        device,
    } = args;
    let base_dir = smelt::hub::resolve_arg(&base, "the base model")?;
    let tuned_dir = smelt::hub::resolve_arg(&tuned, "the fine-tuned model")?;
    // held until the adapter is in place: no other smelt writes OUT meanwhile
    let _lock = claim_output(
        &out,
        &[
            Protected::input("the base model", &base_dir),
            Protected::input("the fine-tuned model", &tuned_dir),
        ],
        Start::Fresh { force },
        false,
    )?;
    let b = ModelFolder::open(&base_dir, &base.display().to_string())?;
    let t = ModelFolder::open(&tuned_dir, &tuned.display().to_string())?;
    let backend = make_backend(&device)?;
    let ex = smelt::lora::extract::extract(&b, &t, rank, backend.as_ref())?;
    for w in &ex.adapter.warnings {
        log::warn!("{w}");
    }
    // the rank used (capped at what the weights can hold)
    let rank = ex.adapter.rank;
    let mut table =
        String::from("| tensor | shape | ‖ΔW‖_F | retained energy |\n|---|---|---|---|\n");
    for m in &ex.modules {
        table.push_str(&format!(
            "| {} | {:?} | {:.4e} | {:.4}% |\n",
            m.tensor,
            m.shape,
            m.norm,
            100.0 * m.energy
        ));
    }
    let total: f64 = ex.modules.iter().map(|m| m.norm * m.norm).sum();
    let kept: f64 = ex.modules.iter().map(|m| m.energy * m.norm * m.norm).sum();
    let min = ex
        .modules
        .iter()
        .min_by(|x, y| x.energy.total_cmp(&y.energy))
        .unwrap();
    let mut card = format!(
        "---\nlibrary_name: peft\ntags:\n- lora\n- smelt\n- extracted\n---\n\n# {}\n\n\
         Rank-{rank} LoRA extracted with smelt {} from `{}` against base `{}` \
         (truncated SVD of each weight's change).\n\nOverall retained energy {:.4}%.\n\n{table}",
        out.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        env!("CARGO_PKG_VERSION"),
        t.label,
        b.label,
        100.0 * kept / total
    );
    if !ex.not_representable.is_empty() {
        card.push_str("\nChanged tensors a LoRA cannot hold (left out):\n\n");
        for (n, norm) in &ex.not_representable {
            card.push_str(&format!("- {n} (‖Δ‖ = {norm:.4e})\n"));
        }
    }
    let dir = smelt::lora::write::write_adapter(
        &out,
        force,
        &ex.adapter.config,
        &ex.adapter.tensors(),
        ex.dtype,
        &card,
    )?;
    print!(
        "{}",
        table
            .lines()
            .skip(2)
            .map(|l| {
                let c: Vec<&str> = l.trim_matches('|').split(" | ").collect();
                format!(
                    "{:<60} {:<12} retained {}\n",
                    c[0].trim(),
                    c[1],
                    c[3].trim()
                )
            })
            .collect::<String>()
    );
    for (n, norm) in &ex.not_representable {
        log::warn!("{n} changed (‖Δ‖ = {norm:.3e}) but is not a 2-D weight: a LoRA cannot hold it; left out");
    }
    println!(
        "extracted {} modules at rank {rank} into {} on {}: overall retained energy {:.4}%, lowest {:.4}% ({})",
        ex.modules.len(),
        dir.display(),
        backend.name(),
        100.0 * kept / total,
        100.0 * min.energy,
        min.tensor
    );
    Ok(())
}
