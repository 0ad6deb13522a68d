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

use super::args::{make_backend, DeviceArgs, DeviceChoice, HashChoice, ShardSize};
use super::execute::{install_stop_handler, print_linalg};

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The recipe (mergekit YAML).
    pub recipe: PathBuf,
    /// Output folder, as mergekit-yaml takes it (the same as -o; give one of the two). A
    /// path ending in `.safetensors` writes that one file instead of a folder.
    #[arg(value_name = "OUT_PATH")]
    pub out_path: Option<PathBuf>,
    /// Output folder (refused if it exists, unless --force). A path ending in `.safetensors`
    /// writes that one file with every tensor (no config, tokenizer or model card).
    #[arg(short, long)]
    pub out: Option<PathBuf>,
    /// Check the recipe and models, print the plan, and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Seed of the random methods (DARE); overrides the recipe's `seed`. Default 0.
    #[arg(long, visible_alias = "random-seed")]
    pub seed: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(short = 'j', long, visible_alias = "num-threads")]
    pub threads: Option<usize>,
    /// Largest shard to write: 5GB, 500MB, 2GiB, or a plain number of bytes. A bare `B` is
    /// mergekit's billion: 5B = 5e9 bytes (K, M: thousand, million).
    #[arg(long, default_value = "5GB")]
    pub out_shard_size: ShardSize,
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
    /// Merge models whose config.json names different architectures (`architectures`,
    /// `model_type`); without it such a merge is refused, as mergekit refuses it.
    #[arg(long)]
    pub allow_crimes: bool,
    /// The hash the manifest records for each file: blake3 (fast, on every core) or sha256
    /// (what `sha256sum` checks; about 20x slower here).
    #[arg(long, value_enum, default_value = "blake3")]
    pub hash: HashChoice,
    /// Flush the output to disk (fsync) before renaming it into place, so that it survives
    /// a power cut, not only a crash of smelt.
    #[arg(long)]
    pub fsync: bool,
    /// List every tensor in --dry-run output (may be repeated, as mergekit's -v).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub mergekit: MergekitArgs,
}

/// mergekit-yaml's options, so that its command lines run unchanged (`smelt merge
/// config.yml ./out --cuda --allow-crimes --lazy-unpickle`). Those with no counterpart in
/// smelt are accepted with a one-line warning that says so.
#[derive(clap::Args)]
#[command(next_help_heading = "mergekit-yaml options")]
pub struct MergekitArgs {
    /// Use the GPU: the same as --device gpu.
    #[arg(long, conflicts_with = "device")]
    pub cuda: bool,
    /// Copy the tokenizer files to the output (the default).
    #[arg(long, overrides_with = "no_copy_tokenizer")]
    pub copy_tokenizer: bool,
    /// Write no tokenizer files, unless the recipe names a `tokenizer_source` (as mergekit).
    #[arg(long, overrides_with = "copy_tokenizer")]
    pub no_copy_tokenizer: bool,
    /// Write README.md, the model card (the default).
    #[arg(long, overrides_with = "no_write_model_card")]
    pub write_model_card: bool,
    /// Write no model card.
    #[arg(long, overrides_with = "write_model_card")]
    pub no_write_model_card: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Accepted, no effect: smelt always reads checkpoints lazily, tensor by tensor.
    #[arg(long)]
    pub lazy_unpickle: bool,
    /// Accepted, no effect: smelt always writes safetensors.
    #[arg(long, overrides_with = "no_safe_serialization")]
    pub safe_serialization: bool,
    /// Accepted, no effect: smelt writes safetensors anyway, never pickles (a warning says so).
    #[arg(long, overrides_with = "safe_serialization")]
    pub no_safe_serialization: bool,
    /// Accepted, no effect: smelt runs no code from model folders.
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Accepted, no effect (smelt streams tensor by tensor on every device).
    #[arg(long)]
    pub low_cpu_memory: bool,
    /// Accepted, no effect (smelt writes each tensor once).
    #[arg(long)]
    pub clone_tensors: bool,
    /// Accepted, no effect (the GPU backend uploads what each tensor needs).
    #[arg(long)]
    pub read_to_gpu: bool,
    /// Accepted, no effect: smelt uses one GPU (--adapter picks it).
    #[arg(long)]
    pub multi_gpu: bool,
    /// The same as --cuda (mergekit's --cuda --low-cpu-memory --read-to-gpu --multi-gpu).
    #[arg(long, conflicts_with = "device")]
    pub gpu_rich: bool,
    /// Accepted, no effect (smelt's writer already runs beside the merge).
    #[arg(long)]
    pub async_write: bool,
    /// Accepted, no effect.
    #[arg(long, value_name = "N")]
    pub write_threads: Option<usize>,
    /// Accepted, no effect: LoRA adapters are applied in memory, never cached on disk.
    #[arg(long, value_name = "PATH")]
    pub lora_merge_cache: Option<PathBuf>,
    /// Accepted, no effect: LoRA deltas are computed in float32.
    #[arg(long, value_name = "DTYPE")]
    pub lora_merge_dtype: Option<String>,
    /// Accepted, no effect: smelt takes no cache folder option.
    #[arg(long, value_name = "PATH")]
    pub transformers_cache: Option<PathBuf>,
}

impl MergekitArgs {
    /// One line for each option given that changes nothing in smelt.
    pub fn no_effect_warnings(&self) -> Vec<String> {
        let flags: [(&str, bool, &str); 13] = [
            (
                "--lazy-unpickle",
                self.lazy_unpickle,
                "smelt always reads checkpoints lazily",
            ),
            (
                "--safe-serialization",
                self.safe_serialization,
                "smelt always writes safetensors",
            ),
            (
                "--no-safe-serialization",
                self.no_safe_serialization,
                "smelt writes safetensors anyway, never pickles",
            ),
            (
                "--trust-remote-code",
                self.trust_remote_code,
                "smelt runs no code from model folders",
            ),
            (
                "--low-cpu-memory",
                self.low_cpu_memory,
                "smelt streams tensor by tensor on every device",
            ),
            (
                "--clone-tensors",
                self.clone_tensors,
                "smelt writes each tensor once",
            ),
            (
                "--read-to-gpu",
                self.read_to_gpu,
                "the GPU backend uploads what each tensor needs",
            ),
            (
                "--multi-gpu",
                self.multi_gpu,
                "smelt uses one GPU; --adapter picks it",
            ),
            (
                "--async-write",
                self.async_write,
                "smelt's writer already runs beside the merge",
            ),
            (
                "--write-threads",
                self.write_threads.is_some(),
                "smelt writes with one thread beside the merge",
            ),
            (
                "--lora-merge-cache",
                self.lora_merge_cache.is_some(),
                "LoRA adapters are applied in memory, never cached on disk",
            ),
            (
                "--lora-merge-dtype",
                self.lora_merge_dtype.is_some(),
                "LoRA deltas are computed in float32",
            ),
            (
                "--transformers-cache",
                self.transformers_cache.is_some(),
                "smelt takes no cache folder option",
            ),
        ];
        flags
            .iter()
            .filter(|(_, given, _)| *given)
            .map(|(flag, _, why)| format!("{flag} has no effect in smelt: {why}"))
            .collect()
    }
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let MergeArgs {
        recipe,
        out_path,
        out,
        dry_run,
        seed,
        threads,
        out_shard_size,
        force,
        resume,
        allow_nonfinite,
        allow_crimes,
        hash,
        fsync,
        verbose,
        mut device,
        mergekit,
    } = args;
    let out = match (out_path, out) {
        (Some(p), Some(o)) => bail!(
            "the output is given twice: {} (positional OUT_PATH) and {} (-o); give one of them",
            p.display(),
            o.display()
        ),
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => bail!(
            "no output: name it after the recipe (`smelt merge recipe.yml OUT`, as mergekit-yaml) or with -o OUT"
        ),
    };
    for w in mergekit.no_effect_warnings() {
        log::warn!("{w}");
    }
    if mergekit.cuda || mergekit.gpu_rich {
        device.device = DeviceChoice::Gpu;
    }
    let shard = out_shard_size.get();
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    let single_file = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let recipe_path = recipe;
    // a dry run reads no tensor data: Hub models whose weights are not cached are planned
    // from their safetensors headers, fetched by range requests, not downloaded
    let plan_only = dry_run.then(smelt::hub::headers::PlanOnly::enter);
    let recipe = Recipe::load(&recipe_path)?;
    let named_tokenizer = recipe.tokenizer_source.is_some();
    let mut plan = Plan::build(recipe, seed)?;
    if !allow_crimes {
        plan.check_architectures()?;
    }
    if mergekit.no_copy_tokenizer && !named_tokenizer {
        plan.tokenizer_from = None;
    }
    plan.write_card = !mergekit.no_write_model_card;
    let threads = rayon::current_num_threads();
    // The output keeps clear of every input, the recipe and the recipe's folder.
    let mut protected = plan.input_paths();
    protected.push(Protected::input("the recipe", &recipe_path));
    let recipe_dir = recipe_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    protected.push(Protected::folder("the recipe's folder", recipe_dir));
    let shard = if single_file { u64::MAX } else { shard };
    let layout = exec::layout(&plan, shard);
    if layout.shards.len() > MANY_SHARDS {
        log::warn!(
            "--out-shard-size {} makes {} shards; did you mean a larger size (5GB, or mergekit's 5B = 5e9 bytes)?",
            units::bytes(shard),
            layout.shards.len()
        );
    }
    if dry_run {
        check_clear_of(&out, &protected)?;
        let summary = plan.summary(threads, layout.shards.len(), verbose > 0);
        // Hub models planned from their headers: said beside the models, before the tensors
        let hub: String = plan_only
            .iter()
            .flat_map(|p| p.stand_ins())
            .map(|s| {
                format!(
                    "hub         {} (commit {}): planned from the safetensors headers; the weights are not downloaded (a merge downloads {} in {} file{})\n",
                    s.id,
                    s.sha,
                    units::bytes(s.weight_bytes),
                    s.weight_files,
                    if s.weight_files == 1 { "" } else { "s" }
                )
            })
            .collect();
        match summary.split_once("\n\n") {
            Some((head, tasks)) => print!("{head}\n{hub}\n{tasks}"),
            None => print!("{summary}{hub}"),
        }
        return Ok(());
    }
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    if single_file {
        return merge_to_file(
            &plan,
            &out,
            &protected,
            &device,
            force,
            resume,
            allow_nonfinite,
            !mergekit.quiet,
        );
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
            progress: !mergekit.quiet,
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

/// More shards than this is almost surely a unit mistake (`--out-shard-size 1KB`).
const MANY_SHARDS: usize = 1000;

/// `-o merged.safetensors`: every tensor in that one file, as Stable Diffusion tools write
/// them. The merge runs into a hidden folder beside it (`.NAME.smelt-single`), whose one
/// shard is then renamed to OUT and the folder removed; config, tokenizer and model card are
/// not kept (a warning says so). OUT is never replaced, and a stopped run leaves nothing.
#[allow(clippy::too_many_arguments)]
fn merge_to_file(
    plan: &Plan,
    out: &Path,
    protected: &[Protected],
    device: &DeviceArgs,
    force: bool,
    resume: bool,
    allow_nonfinite: bool,
    progress: bool,
) -> anyhow::Result<()> {
    let err = |msg: &str| smelt::Error::Output {
        path: out.to_path_buf(),
        msg: msg.to_string(),
    };
    if resume {
        return Err(err("is a single file, which --resume cannot continue; run the merge again without --resume").into());
    }
    check_clear_of(out, protected)?;
    if out.exists() || out.is_symlink() {
        return Err(err(if force {
            "already exists; smelt does not replace a single file, even with --force: remove it yourself or name another file"
        } else {
            "already exists; smelt does not replace a file: remove it yourself or name another file"
        })
        .into());
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(err(&format!(
            "the folder {} does not exist; create it first",
            dir.display()
        ))
        .into());
    }
    let stage = dir.join(format!(".{name}.smelt-single"));
    // the staging folder is smelt's own: an earlier stopped run's is replaced
    let start = Start::Fresh { force: true };
    let _lock = claim_output(&stage, protected, start, false)?;
    let backend = make_backend(device)?;
    let cpu = Cpu::new();
    let fallback: Option<&dyn Backend> = device.cpu_fallback().then_some(&cpu);
    install_stop_handler();
    log::info!(
        "merging {} tensors with {} on {} into the single file {}",
        plan.tasks.len(),
        plan.method.name,
        backend.name(),
        out.display()
    );
    let r = exec::execute(
        plan,
        backend.as_ref(),
        &ExecOptions {
            out_dir: stage.clone(),
            start,
            max_shard_bytes: u64::MAX,
            progress,
            allow_nonfinite,
            fallback,
            hash: smelt::io::writer::HashAlgo::Blake3,
            fsync: false,
        },
    );
    let report = match r {
        Err(smelt::Error::Stopped { path, .. }) => {
            let _ = std::fs::remove_dir_all(&path);
            return Err(smelt::Error::Cancelled {
                path: out.to_path_buf(),
            }
            .into());
        }
        r => r?,
    };
    let shard = report.out_dir.join("model.safetensors");
    let placed = if out.exists() || out.is_symlink() {
        Err(err(
            "appeared while smelt was merging; it is left as it was and the merge is discarded",
        ))
    } else {
        std::fs::rename(&shard, out).map_err(|e| smelt::Error::Io {
            path: out.to_path_buf(),
            source: e,
        })
    };
    let _ = std::fs::remove_dir_all(&report.out_dir);
    placed?;
    log::warn!(
        "{} is a single safetensors file: no config.json, tokenizer or model card are written with it (name a folder for a model transformers loads)",
        out.display()
    );
    println!(
        "merged {} tensors into {} ({}) in {:.2} s, on {}",
        report.tensors,
        out.display(),
        units::bytes(report.bytes_written),
        report.seconds,
        report.backend
    );
    print_linalg(&report);
    Ok(())
}
