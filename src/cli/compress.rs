//! `smelt compress`: a fine-tune as a ComPEFT sparse ternary task vector, with its model card.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use smelt::io::guard::{claim_output, Protected};
use smelt::io::model::ModelFolder;
use smelt::io::writer::Start;

use super::args::{make_backend, DeviceArgs};

#[derive(clap::Args)]
pub struct CompressArgs {
    /// The fine-tuned model folder (or Hub id org/name[@revision]).
    pub model: PathBuf,
    /// The base model it was fine-tuned from (a folder or Hub id).
    #[arg(long)]
    pub base: PathBuf,
    /// Output folder (refused if it exists, unless --force).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Share of the task vector's entries kept, in (0, 1) (ComPEFT's k / 100).
    #[arg(long, default_value_t = 0.1)]
    pub density: f64,
    /// The kept entries become ±alpha·σ (ComPEFT's replace_factor).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
    /// Replace OUT if it is an earlier smelt output or an empty folder (the old folder is
    /// removed only after the new one is complete). Any other folder is refused.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: CompressArgs) -> anyhow::Result<()> {
    let CompressArgs {
        model,
        base,
        out,
        density,
        alpha,
        force,
        device,
    } = args;
    let model_dir = smelt::hub::resolve_arg(&model, "the model")?;
    let base_dir = smelt::hub::resolve_arg(&base, "--base")?;
    // held until the output is in place: no other smelt writes OUT meanwhile
    let _lock = claim_output(
        &out,
        &[
            Protected::input("the model", &model_dir),
            Protected::input("the base model", &base_dir),
        ],
        Start::Fresh { force },
        false,
    )?;
    let m = ModelFolder::open(&model_dir, &model.display().to_string())?;
    let b = ModelFolder::open(&base_dir, &base.display().to_string())?;
    let backend = make_backend(&device)?;
    let settings = smelt::compeft::Settings { density, alpha };
    settings.check()?;
    let names = m.names().len() as u64;
    let pb = ProgressBar::new(4 * names);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .unwrap(),
    );
    let tick = |n: &str| {
        pb.inc(1);
        pb.set_message(n.to_string());
    };
    let label = m.label.clone();
    let base_label = b.label.clone();
    let card = |r: &smelt::compeft::Report| compeft_card(r, &settings, &label, &base_label, &out);
    let r = smelt::compeft::compress(
        &m,
        &b,
        &settings,
        backend.as_ref(),
        &out,
        force,
        &tick,
        &card,
    );
    pb.finish_and_clear();
    let r = r?;
    println!(
        "compressed {} into {} on {}: kept {} of {} entries ({:.4}%, threshold |τ| ≥ {:e}), σ = {:e}, values ±{:e}; {} of float weights -> {} of bit maps: {:.1}x smaller",
        m.label,
        r.out_dir.display(),
        backend.name(),
        r.nnz,
        r.stats.total,
        100.0 * r.nnz as f64 / r.stats.total as f64,
        r.stats.threshold,
        r.stats.sigma,
        r.stats.scale,
        smelt::units::bytes(r.model_bytes),
        smelt::units::bytes(r.packed_bytes),
        r.ratio()
    );
    Ok(())
}

fn compeft_card(
    r: &smelt::compeft::Report,
    s: &smelt::compeft::Settings,
    model: &str,
    base: &str,
    out: &Path,
) -> String {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    format!(
        "---\ntags:\n- smelt\n- compeft\n- task-vector\n---\n\n# {name}\n\n\
         A ComPEFT-compressed task vector (Yadav et al. 2023, arXiv 2311.13171) written by smelt {}: \
         `{model}` minus the base `{base}`, reduced to its largest entries, each stored as ±scale.\n\n\
         | | |\n|---|---|\n\
         | density | {} |\n| alpha | {} |\n| σ (std of the task vector) | {:e} |\n\
         | scale = alpha·σ | {:e} |\n| threshold (smallest kept abs value) | {:e} |\n\
         | entries | {} |\n| kept (at or above the threshold) | {} |\n| non-zeros stored | {} |\n\
         | float weights | {} bytes |\n| bit maps | {} bytes |\n| compression ratio | {:.2}x |\n\n\
         ## Use\n\nIn a smelt recipe, `model: {name}` stands for base + the decompressed task vector \
         (the base is found from the path recorded in compeft.safetensors and must have the recorded \
         digest), or write `model: BASE+{name}`.\n\n\
         ## Layout\n\n`compeft.safetensors` holds, for every float tensor NAME of n elements, \
         `NAME.keep` (U8, ceil(n/8) bytes: bit e%8 of byte e/8, least significant first, set when \
         flat element e is non-zero) and `NAME.sign` (U8: bit j set when the j-th non-zero, in flat \
         order, is negative). Its `__metadata__` records format `smelt-compeft` version 1, scale, \
         sigma, alpha, density, threshold, kept, total, the tensor shapes (JSON), and the base's \
         path and digest. Decompressed: θ = base + scale·(±1 at the kept elements).\n",
        env!("CARGO_PKG_VERSION"),
        s.density,
        s.alpha,
        r.stats.sigma,
        r.stats.scale,
        r.stats.threshold,
        r.stats.total,
        r.stats.kept,
        r.nnz,
        r.model_bytes,
        r.packed_bytes,
        r.ratio()
    )
}
