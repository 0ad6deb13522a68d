//! `smelt merge`: run a mergekit recipe.

use std::path::{Path, PathBuf};

use anyhow::bail;

use smelt::backend::cpu::Cpu;
use smelt::backend::Backend;
use smelt::exec::{self, ExecOptions};
use smelt::io::guard::{check_clear_of, claim_output, Protected};
use smelt::io::writer::Start;
use smelt::plan::Plan;
use smelt::recipe::Recipe;
use smelt::units;

use super::args::{make_backend, ByteSize, DeviceArgs, HashChoice};
use super::execute::{install_stop_handler, print_linalg};

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The recipe (mergekit YAML).
    pub recipe: PathBuf,
    /// Output folder (refused if it exists, unless --force).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Check the recipe and models, print the plan, and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Seed of the random methods (DARE); overrides the recipe's `seed`. Default 0.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Largest shard to write, e.g. 5GB, 500MB, 2GiB.
    #[arg(long, default_value = "5GB")]
    pub out_shard_size: ByteSize,
    /// Replace OUT if it is an earlier smelt output or an empty folder (the old folder is
    /// removed only after the new one is complete). Any other folder is refused.
    #[arg(long)]
    pub force: bool,
    /// Continue an interrupted merge of the same recipe into OUT, reusing every shard that
    /// was finished and still verifies (the result is the same, byte for byte).
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Merge inputs that hold NaN or infinity instead of stopping at the first one.
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// The hash the manifest records for each file: blake3 (fast, on every core) or sha256
    /// (what `sha256sum` checks; about 20x slower here).
    #[arg(long, value_enum, default_value = "blake3")]
    pub hash: HashChoice,
    /// Flush the output to disk (fsync) before renaming it into place, so that it survives
    /// a power cut, not only a crash of smelt.
    #[arg(long)]
    pub fsync: bool,
    /// List every tensor in --dry-run output.
    #[arg(short, long)]
    pub verbose: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let MergeArgs {
        recipe,
        out,
        dry_run,
        seed,
        threads,
        out_shard_size,
        force,
        resume,
        allow_nonfinite,
        hash,
        fsync,
        verbose,
        device,
    } = args;
    let shard = out_shard_size.get();
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    let recipe_path = recipe;
    let recipe = Recipe::load(&recipe_path)?;
    let plan = Plan::build(recipe, seed)?;
    let threads = rayon::current_num_threads();
    // The output keeps clear of every input, the recipe and the recipe's folder.
    let mut protected = plan.input_paths();
    protected.push(Protected::input("the recipe", &recipe_path));
    let recipe_dir = recipe_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    protected.push(Protected::folder("the recipe's folder", recipe_dir));
    if dry_run {
        check_clear_of(&out, &protected)?;
        let layout = exec::layout(&plan, shard);
        print!("{}", plan.summary(threads, layout.shards.len(), verbose));
        return Ok(());
    }
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    let start = if resume {
        Start::Resume
    } else {
        Start::Fresh { force }
    };
    // held until the merge is in place: no other smelt writes OUT meanwhile
    let _lock = claim_output(&out, &protected, start, true)?;
    let backend = make_backend(&device)?;
    let cpu = Cpu::new();
    // Under --device auto a GPU failure mid-merge finishes the merge on the CPU.
    let fallback: Option<&dyn Backend> = device.cpu_fallback().then_some(&cpu);
    install_stop_handler();
    log::info!(
        "merging {} tensors with {} on {}",
        plan.tasks.len(),
        plan.method.name,
        backend.name()
    );
    let report = exec::execute(
        &plan,
        backend.as_ref(),
        &ExecOptions {
            out_dir: out,
            start,
            max_shard_bytes: shard,
            progress: true,
            allow_nonfinite,
            fallback,
            hash: hash.into(),
            fsync,
        },
    )?;
    let moved = report.bytes_read + report.bytes_written;
    if report.reused > 0 {
        println!("resumed: {} tensors were already merged", report.reused);
    }
    println!(
        "merged {} tensors into {} ({} shard{}, {}) in {:.2} s, {}/s read+written, on {}",
        report.tensors,
        report.out_dir.display(),
        report.shards,
        if report.shards == 1 { "" } else { "s" },
        units::bytes(report.bytes_written),
        report.seconds,
        units::bytes((moved as f64 / report.seconds.max(1e-9)) as u64),
        report.backend
    );
    print_linalg(&report);
    Ok(())
}
