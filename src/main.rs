//! The `smelt` command line.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use smelt::backend::cpu::Cpu;
use smelt::backend::gpu::{list_adapters, Gpu, GpuContext, GpuOptions};
use smelt::backend::Backend;
use smelt::bench;
use smelt::exec::{self, ExecOptions};
use smelt::io::model::ModelFolder;
use smelt::io::verify::verify;
use smelt::io::writer::{parse_size, HashAlgo, Start};
use smelt::lora::Adapter;
use smelt::methods::{self, Default, Scope};
use smelt::plan::Plan;
use smelt::recipe::Recipe;
use smelt::units;

#[derive(Parser)]
#[command(
    name = "smelt",
    version,
    about = "Merge fine-tuned checkpoints into one model, on the GPU you have or the CPU.",
    long_about = "Merge fine-tuned checkpoints of one base model into a single model.\n\n\
        smelt reads mergekit's YAML recipes unchanged, reads Hugging Face model folders \
        (safetensors, single or sharded; F32/F16/BF16) memory-mapped, and writes a folder that \
        `transformers` loads: sharded safetensors with an index, config.json, tokenizer files and \
        a model card.\n\n\
        Start with `smelt methods` to see what it can do, then `smelt merge recipe.yml -o out --dry-run`.",
    after_help = "Logging: set RUST_LOG (e.g. RUST_LOG=smelt=debug)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct DeviceArgs {
    /// Where the math runs: `auto` uses a GPU when one works (not a software Vulkan renderer
    /// such as lavapipe unless --adapter names it) and says so when it falls back to the CPU;
    /// `gpu` fails if no GPU can be used; `cpu` never touches the GPU.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// GPU adapter to use: an index or part of a name from `smelt devices`.
    #[arg(long)]
    adapter: Option<String>,
    /// Bytes of a tensor's inputs the GPU may keep resident (e.g. 4GiB); larger tensors stream
    /// through in tiles. Default 2GiB.
    #[arg(long)]
    vram_budget: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceChoice {
    Auto,
    Gpu,
    Cpu,
}

fn make_backend(d: &DeviceArgs) -> anyhow::Result<Box<dyn Backend>> {
    if d.device == DeviceChoice::Cpu {
        return Ok(Box::new(Cpu::new()));
    }
    let opts = GpuOptions {
        adapter: d.adapter.clone(),
        vram_budget: d
            .vram_budget
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("--vram-budget")?,
        tile_elems: None,
    };
    match Gpu::new(&opts) {
        // A software Vulkan driver (lavapipe/llvmpipe, SwiftShader) runs the kernels on the
        // CPU far slower than smelt's own CPU path: auto takes it only when it is named.
        Ok(g)
            if d.device == DeviceChoice::Auto
                && d.adapter.is_none()
                && g.ctx.info.device_type == "Cpu" =>
        {
            log::info!(
                "the only GPU adapter is {} (a software renderer, slower than smelt's CPU path); running on the CPU (--device gpu or --adapter uses it anyway)",
                g.ctx.info.name
            );
            Ok(Box::new(Cpu::new()))
        }
        Ok(g) => Ok(Box::new(g)),
        Err(e) if d.device == DeviceChoice::Auto => {
            log::info!("no usable GPU ({e}); running on the CPU");
            Ok(Box::new(Cpu::new()))
        }
        Err(e) => Err(anyhow::Error::new(e).context("--device gpu")),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Merge models as a recipe says.
    #[command(
        long_about = "Merge models as a recipe says.\n\n\
        The recipe is mergekit's YAML (merge_method, base_model, models or slices, parameters, \
        dtype, out_dtype, tokenizer_source) plus smelt's `seed`. Model paths are relative to the \
        recipe's folder. Everything that can be checked from file headers is checked before any \
        tensor is read; --dry-run stops there and prints the plan.\n\n\
        The output is written to a hidden temporary folder beside OUT and renamed into place \
        only when complete.",
        after_help = "Example:\n  smelt merge assets/recipes/ties.yml -o merged --dry-run\n  smelt merge assets/recipes/ties.yml -o merged"
    )]
    Merge {
        /// The recipe (mergekit YAML).
        recipe: PathBuf,
        /// Output folder (refused if it exists, unless --force).
        #[arg(short, long)]
        out: PathBuf,
        /// Check the recipe and models, print the plan, and stop.
        #[arg(long)]
        dry_run: bool,
        /// Seed of the random methods (DARE); overrides the recipe's `seed`. Default 0.
        #[arg(long)]
        seed: Option<u64>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Largest shard to write, e.g. 5GB, 500MB, 2GiB.
        #[arg(long, default_value = "5GB")]
        out_shard_size: String,
        /// Replace OUT if it exists (the old folder is removed only after the new one is complete).
        #[arg(long)]
        force: bool,
        /// Continue an interrupted merge of the same recipe into OUT, reusing every shard that
        /// was finished and still verifies (the result is the same, byte for byte).
        #[arg(long, conflicts_with = "force")]
        resume: bool,
        /// Merge inputs that hold NaN or infinity instead of stopping at the first one.
        #[arg(long)]
        allow_nonfinite: bool,
        /// The hash the manifest records for each file: blake3 (fast, on every core) or sha256
        /// (what `sha256sum` checks; about 20x slower here).
        #[arg(long, default_value = "blake3", value_parser = ["blake3", "sha256"])]
        hash: String,
        /// Flush the output to disk (fsync) before renaming it into place, so that it survives
        /// a power cut, not only a crash of smelt.
        #[arg(long)]
        fsync: bool,
        /// List every tensor in --dry-run output.
        #[arg(short, long)]
        verbose: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Work with LoRA adapters (PEFT folders): bake one into a model, merge several into one,
    /// or extract one from a fine-tuned model.
    #[command(subcommand)]
    Lora(LoraCmd),
    /// Fold one more fine-tuned model into an OPCM merge (continual merging), from the state
    /// file that merge left.
    #[command(
        long_about = "Fold one more fine-tuned model into an existing OPCM merge (orthogonal projection \
        continual merging, Tang et al. 2025), without the models merged before.\n\n\
        An OPCM merge (a recipe with `merge_method: opcm`, or an earlier `smelt continual`) writes \
        opcm-state.json beside its weights: alpha, the λ of the next step, the norm of every task \
        vector folded in so far, and the base and models with their digests. `smelt continual` \
        reads it, adds NEW's task vector outside the merged task vector's leading singular \
        subspace (per linear weight), rescales to the mean task-vector norm, and writes a new \
        folder with the updated state. Folding models one call at a time gives the same weights \
        as one recipe with all of them in that order (up to the rounding of the stored \
        intermediate merges: keep them in float32 for that). Memory and time do not grow with the \
        number of models folded in before.\n\n\
        The base is found from the state (its digest is checked); --base names it when it moved. \
        Without a state file, MERGED is treated as the first model and --base is required.",
        after_help = "Example:\n  smelt merge opcm.yml -o merged-2          # models: [math, code]\n  smelt continual merged-2 ./chat -o merged-3\n  smelt continual merged-3 ./tools -o merged-4"
    )]
    Continual {
        /// An OPCM merge (with opcm-state.json), or a first fine-tuned model (with --base).
        merged: PathBuf,
        /// The fine-tuned model to fold in.
        new: PathBuf,
        /// Output folder (refused if it exists, unless --force).
        #[arg(short, long)]
        out: PathBuf,
        /// The base model (default: the one the state file records).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Share of the merged task vector's singular value mass whose subspace NEW may not
        /// write into (default: the state's; 0.5 without one).
        #[arg(long)]
        alpha: Option<f64>,
        /// Largest shard to write, e.g. 5GB, 500MB, 2GiB.
        #[arg(long, default_value = "5GB")]
        out_shard_size: String,
        /// Replace OUT if it exists (the old folder is removed only after the new one is complete).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Compress a fine-tune into a sparse ternary task vector (ComPEFT) that recipes can use
    /// in place of the model.
    #[command(
        long_about = "Compress a fine-tuned model into a sparse ternary task vector (ComPEFT, \
        Yadav et al. 2023) and write it as a folder with compeft.safetensors and a model card.\n\n\
        The task vector τ = MODEL − BASE of every float tensor is reduced, over the whole model at \
        once, to the --density share of its largest-magnitude entries (int(d·density) + 1 of d, \
        ties at the threshold included, as the reference code keeps them); each kept entry becomes \
        ±alpha·σ, σ the standard deviation of all of τ. What is stored: one bit per element \
        (kept or not) and one sign bit per kept element, so about 1 + density bits per weight \
        instead of 16 for bf16; the compression ratio is printed and recorded. The statistics \
        (σ and the whole-model threshold) run on the chosen device; memory stays that of one \
        tensor.\n\n\
        In a recipe, the folder stands wherever a model does: `model: OUT` adds the compressed \
        task vector to the base it was made against (its path and content digest are recorded), \
        or `model: BASE+OUT` names the base explicitly. A base with another digest is refused.\n\n\
        alpha rescales the ternary values: the paper tunes it on validation data (values between \
        about 0.5 and 10); alpha 1 keeps the task vector's own spread.",
        after_help = "Examples:\n  smelt compress ./Mistral-7B-math --base ./Mistral-7B -o ./math-compeft --density 0.1\n  # then, in a recipe: models: [{model: ./math-compeft, parameters: {weight: 1.0}}]"
    )]
    Compress {
        /// The fine-tuned model folder.
        model: PathBuf,
        /// The base model it was fine-tuned from.
        #[arg(long)]
        base: PathBuf,
        /// Output folder (refused if it exists, unless --force).
        #[arg(short, long)]
        out: PathBuf,
        /// Share of the task vector's entries kept, in (0, 1) (ComPEFT's k / 100).
        #[arg(long, default_value_t = 0.1)]
        density: f64,
        /// The kept entries become ±alpha·σ (ComPEFT's replace_factor).
        #[arg(long, default_value_t = 1.0)]
        alpha: f64,
        /// Replace OUT if it exists (the old folder is removed only after the new one is complete).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// List the GPU adapters smelt can use (name, vendor, backend, type, driver, limits).
    Devices,
    /// Measure every primitive and method on generated data, on the CPU and every usable
    /// GPU, against this machine's memory-copy (and host-device copy) bandwidth.
    #[command(after_help = "Example:\n  smelt bench --elements 64M --json bench.json")]
    Bench {
        /// Elements per input tensor (e.g. 16M, 64M).
        #[arg(long, default_value = "16M")]
        elements: String,
        /// Fine-tuned models besides the base.
        #[arg(long, default_value_t = 3)]
        models: usize,
        /// Runs per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Which backends: all (CPU and every GPU adapter), cpu, or gpu.
        #[arg(long, default_value = "all", value_parser = ["all", "cpu", "gpu"])]
        device: String,
        /// Only primitives or only methods.
        #[arg(long, value_parser = ["primitives", "methods"])]
        only: Option<String>,
        /// Also write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Check a merged folder: re-hash every file against its manifest, and the shards
    /// against the index.
    Verify {
        /// A folder written by `smelt merge`.
        dir: PathBuf,
    },
    /// List the merge methods with their parameters and defaults.
    Methods {
        /// Show only this method.
        name: Option<String>,
    },
    /// Show a model folder's tensors, dtypes, shapes and size.
    Inspect {
        /// A model folder, or one .safetensors file.
        model: PathBuf,
        /// Print every tensor (default: the first 50).
        #[arg(short, long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum LoraCmd {
    /// Bake a LoRA adapter into its base model: W + s·B·A for every module it adapts, its full
    /// tensors (modules_to_save) in place of the base's. PEFT's `merge_and_unload`.
    #[command(
        long_about = "Bake a LoRA adapter into its base model and write a full model folder.\n\n\
        ADAPTER is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors). \
        For every module it adapts, smelt adds ΔW = s·B·A (s = lora_alpha/r, or lora_alpha/√r with \
        use_rslora; rank_pattern and alpha_pattern honoured; embeddings transposed as PEFT does) \
        to the base tensor in the base's dtype, forming one ΔW at a time on the chosen device. \
        Full tensors the adapter carries (modules_to_save, base_layer copies) replace the base's. \
        Every module is checked against the base before anything is read: an adapter trained on \
        another base is refused, naming the module and both shapes.\n\n\
        This is the same as the recipe `merge_method: passthrough` with `model: BASE+ADAPTER`; \
        in recipes, `BASE+ADAPTER` works with every method.",
        after_help = "Example:\n  smelt lora apply ./Llama-3-8B ./my-lora -o ./Llama-3-8B-my-lora"
    )]
    Apply {
        /// The base model folder.
        base: PathBuf,
        /// The PEFT LoRA adapter folder.
        adapter: PathBuf,
        /// Output folder (refused if it exists, unless --force).
        #[arg(short, long)]
        out: PathBuf,
        /// Replace OUT if it exists (the old folder is removed only after the new one is complete).
        #[arg(long)]
        force: bool,
        /// Largest shard to write, e.g. 5GB, 500MB, 2GiB.
        #[arg(long, default_value = "5GB")]
        out_shard_size: String,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Merge LoRA adapters into one adapter that PEFT loads (PEFT's `add_weighted_adapter`).
    #[command(
        long_about = "Merge LoRA adapters of one base model into a single adapter folder \
        (adapter_config.json + adapter_model.safetensors) that PEFT loads. The arithmetic is PEFT's \
        `add_weighted_adapter`, checked against adapters PEFT 0.21.2 merged:\n\n\
        * linear, ties, dare_linear, dare_ties, magnitude_prune: the A matrices are merged among \
        themselves and the B matrices among themselves, with weights √|w·s|·sign(w·s) on A and \
        √|w·s| on B (s = each adapter's scale); pruning (--density) acts on each factor. All \
        adapters need the same rank. The product B'A' holds cross terms, so this is only roughly \
        Σ w·s·B·A; use cat or svd for the exact weighted sum.\n\
        * cat: stacks the ranks (rank = Σ ranks): exactly Σ w·s·B·A.\n\
        * svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: forms each module's \
        ΔW = s·B·A on the device, combines them with the weights (pruning ΔW for the ties/dare/\
        magnitude variants), and re-factors with a truncated SVD to --svd-rank (default: the \
        largest input rank). --svd-clamp Q then clamps B' = U·diag(S) and A' = Vᵀ of each module \
        to ±the Q-quantile of their values, as PEFT's svd_clamp does (torch.quantile's linear \
        interpolation, to the bit). The quantile is over signed values, so which values are \
        clipped depends on the SVD's sign choice per rank, which differs between implementations \
        (and between smelt's CPU and GPU); smelt's result is PEFT's rule applied to its own SVD.\n\n\
        The merged adapter has r = lora_alpha = its rank (scale 1) and otherwise the first \
        adapter's config. As in PEFT, a first adapter with use_rslora makes the merged scale √r; \
        smelt warns when that happens. Adapters with modules_to_save are merged as PEFT does: two \
        with a trained copy of the same module are refused, and otherwise the trained copies are \
        dropped with a warning (those modules stay as in the base; apply the adapters in a recipe \
        and merge the models to keep them). A single adapter is merged with linear whatever --method \
        says, as PEFT does. DARE draws its masks from smelt's seeded generator (--seed), not \
        torch's, so its result matches PEFT's in distribution, not value.\n\n\
        * lego (LoRA-LEGO, Zhao et al. 2025; not in PEFT): every rank-1 unit (row j of A with \
        column j of B, weighted by √|w·s|) of every adapter is a point; per module, k-means \
        (k = --rank) clusters them and each cluster becomes one rank of the result: its centroid \
        scaled by √n on both halves for n members, so identical units add up. k = the total \
        number of units gives cat's exact sum. Scale 1 (use_rslora false).",
        after_help = "Examples:\n  smelt lora merge ./lora-math ./lora-code --method cat --weights 0.7,0.3 -o ./lora-both\n  smelt lora merge ./a ./b ./c --method ties --density 0.5 --weights 0.5,0.3,0.2 -o ./abc\n  smelt lora merge ./a ./b --method svd --svd-rank 16 -o ./ab-r16"
    )]
    Merge {
        /// Two or more PEFT LoRA adapter folders (one is allowed; it is rescaled by its weight).
        #[arg(required = true)]
        adapters: Vec<PathBuf>,
        /// How to combine them.
        #[arg(long, value_parser = [
            "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd",
            "dare_ties", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd", "lego"])]
        method: String,
        /// One weight per adapter, comma-separated (e.g. 0.7,0.3). Default: 1 for each.
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        weights: Option<Vec<f64>>,
        /// Fraction of elements kept by the pruning methods (ties, dare_*, magnitude_prune*).
        #[arg(long)]
        density: Option<f64>,
        /// Sign election of ties and dare_ties: total (sign of the sum) or frequency (majority
        /// of the signs).
        #[arg(long, default_value = "total", value_parser = ["total", "frequency"])]
        majority_sign: String,
        /// Rank of the result of the SVD methods (default: the largest input rank).
        #[arg(long)]
        svd_rank: Option<usize>,
        /// SVD methods: clamp the re-factored B' and A' to ±their Q-quantile (PEFT's
        /// svd_clamp; Q in (0, 1], computed per module over both factors' values).
        #[arg(long, value_name = "Q")]
        svd_clamp: Option<f64>,
        /// Rank of the result of lego: the number of clusters (default: the largest input rank).
        #[arg(long)]
        rank: Option<usize>,
        /// Seed of the DARE draws and of lego's k-means seeding.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output adapter folder (refused if it exists, unless --force).
        #[arg(short, long)]
        out: PathBuf,
        /// Replace OUT if it exists (the old folder is removed only after the new one is complete).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Extract a LoRA adapter from a fine-tuned model: a truncated SVD of each weight's change.
    #[command(
        long_about = "Extract a LoRA adapter of rank R from a fine-tuned model and its base.\n\n\
        For every 2-D weight that differs between TUNED and BASE, smelt forms ΔW = tuned − base \
        (one tensor at a time) and takes its truncated SVD on the chosen device: B = U·diag(S), \
        A = Vᵀ, rank R (embeddings become lora_embedding_A/B, as PEFT stores them). The adapter has \
        r = lora_alpha = R (scale 1) and lists the extracted modules in target_modules.\n\n\
        For each module smelt prints the retained energy Σ_{i<R} σ_i² / ‖ΔW‖²_F: the share of the \
        change the rank keeps (the relative Frobenius error is √(1 − energy)). Changed tensors a \
        LoRA cannot hold (norms, biases) are listed and left out.",
        after_help = "Example:\n  smelt lora extract ./Llama-3-8B ./Llama-3-8B-Instruct --rank 64 -o ./instruct-lora-r64"
    )]
    Extract {
        /// The base model folder.
        base: PathBuf,
        /// The fine-tuned model folder (same architecture and shapes).
        tuned: PathBuf,
        /// Rank of the adapter.
        #[arg(long)]
        rank: usize,
        /// Output adapter folder (refused if it exists, unless --force).
        #[arg(short, long)]
        out: PathBuf,
        /// Replace OUT if it exists (the old folder is removed only after the new one is complete).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

fn main() -> ExitCode {
    quiet_wayland();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("smelt=info"))
        .format_timestamp(None)
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!("\n  caused by: {cause}"));
            }
            eprintln!("{msg}");
            // 130: stopped by a signal, as shells report it
            match e.downcast_ref::<smelt::Error>() {
                Some(smelt::Error::Stopped { .. }) => ExitCode::from(130),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Vulkan loaders on Linux probe for a Wayland display while enumerating adapters, and
/// libwayland prints "error: XDG_RUNTIME_DIR is invalid or not set" when that variable is
/// missing (headless servers, CI). smelt never opens a window; pointing the variable at the
/// temp folder keeps that false alarm off stderr. Done first thing, before any thread exists.
fn quiet_wayland() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}

/// Ctrl-C or SIGTERM: stop after the tensor in hand, keeping what is finished for --resume.
/// A second one ends the process at once.
fn install_stop_handler() {
    let _ = ctrlc::set_handler(|| {
        if smelt::exec::stop_requested() {
            eprintln!("\nstopped at once; the partial output stays hidden and is not resumable past its last finished shard");
            std::process::exit(130);
        }
        eprintln!("\nstopping after the current tensor (press Ctrl-C again to stop at once)…");
        smelt::exec::request_stop();
    });
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Merge {
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
        } => {
            let shard = parse_size(&out_shard_size)
                .map_err(anyhow::Error::msg)
                .context("--out-shard-size")?;
            if let Some(t) = threads {
                if t == 0 {
                    bail!("--threads must be at least 1");
                }
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build_global()?;
            }
            let recipe = Recipe::load(&recipe)?;
            let plan = Plan::build(recipe, seed)?;
            let threads = rayon::current_num_threads();
            if dry_run {
                let layout = exec::layout(&plan, shard);
                print!("{}", plan.summary(threads, layout.shards.len(), verbose));
                return Ok(());
            }
            for w in &plan.warnings {
                log::warn!("{w}");
            }
            let backend = make_backend(&device)?;
            let cpu = Cpu::new();
            // Under --device auto a GPU failure mid-merge finishes the merge on the CPU.
            let fallback: Option<&dyn Backend> =
                (device.device == DeviceChoice::Auto).then_some(&cpu);
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
                    start: if resume {
                        Start::Resume
                    } else {
                        Start::Fresh { force }
                    },
                    max_shard_bytes: shard,
                    progress: true,
                    allow_nonfinite,
                    fallback,
                    hash: HashAlgo::from_name(&hash).expect("clap checked it"),
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
        Cmd::Bench {
            elements,
            models,
            repeats,
            device,
            only,
            json,
        } => {
            let elements = parse_size(&elements)
                .map_err(anyhow::Error::msg)
                .context("--elements")? as usize;
            let mut backends: Vec<(Box<dyn Backend>, bench::Device)> = Vec::new();
            if device != "gpu" {
                backends.push((
                    Box::new(Cpu::new()),
                    bench::Device {
                        backend: "cpu".into(),
                        adapter: "-".into(),
                        vendor: "-".into(),
                        api: "rayon".into(),
                        driver: "-".into(),
                        device_type: format!("{} threads", rayon::current_num_threads()),
                        upload_gbps: None,
                        download_gbps: None,
                    },
                ));
            }
            if device != "cpu" {
                for a in list_adapters() {
                    let ctx = match GpuContext::new(Some(&a.index.to_string())) {
                        Ok(c) => std::sync::Arc::new(c),
                        Err(e) => {
                            log::warn!("skipping {}: {e}", a.name);
                            continue;
                        }
                    };
                    let (up, down) = ctx.transfer_bandwidth(256 << 20)?;
                    backends.push((
                        Box::new(Gpu::with_context(ctx, &GpuOptions::default())),
                        bench::Device {
                            backend: format!("gpu{}", a.index),
                            adapter: a.name.clone(),
                            vendor: format!("{:#06x}", a.vendor),
                            api: a.backend.clone(),
                            driver: format!("{} {}", a.driver, a.driver_info),
                            device_type: a.device_type.clone(),
                            upload_gbps: Some(up),
                            download_gbps: Some(down),
                        },
                    ));
                }
                if device == "gpu" && backends.is_empty() {
                    bail!("no usable GPU adapter");
                }
            }
            let report = bench::run(
                &bench::BenchOptions {
                    elements,
                    models,
                    repeats,
                    primitives: only.as_deref() != Some("methods"),
                    methods: only.as_deref() != Some("primitives"),
                },
                &backends,
            )?;
            print!("{}", bench::table(&report));
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&report)? + "\n")
                    .with_context(|| p.display().to_string())?;
            }
            Ok(())
        }
        Cmd::Verify { dir } => {
            let r = verify(&dir)?;
            println!(
                "{}: {} files verified ({} shard{}, {} tensors, {}): every hash matches its manifest",
                dir.display(),
                r.files,
                r.shards,
                if r.shards == 1 { "" } else { "s" },
                r.tensors,
                units::bytes(r.bytes)
            );
            Ok(())
        }
        Cmd::Continual {
            merged,
            new,
            out,
            base,
            alpha,
            out_shard_size,
            force,
            device,
        } => {
            let shard = parse_size(&out_shard_size)
                .map_err(anyhow::Error::msg)
                .context("--out-shard-size")?;
            let plan =
                smelt::workflows::continual::continual_plan(&merged, &new, base.as_deref(), alpha)?;
            for w in &plan.warnings {
                log::warn!("{w}");
            }
            let report = execute_fresh(&plan, &device, out, force, shard)?;
            let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
                report.out_dir.join(smelt::methods::opcm::STATE_NAME),
            )?)?;
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
        Cmd::Compress {
            model,
            base,
            out,
            density,
            alpha,
            force,
            device,
        } => {
            let m = ModelFolder::open(&model, &model.display().to_string())?;
            let b = ModelFolder::open(&base, &base.display().to_string())?;
            let backend = make_backend(&device)?;
            let settings = smelt::compeft::Settings { density, alpha };
            settings.check()?;
            let names = m.names().len() as u64;
            let pb = ProgressBar::new(4 * names);
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                )
                .unwrap(),
            );
            let tick = |n: &str| {
                pb.inc(1);
                pb.set_message(n.to_string());
            };
            let label = m.label.clone();
            let base_label = b.label.clone();
            let card =
                |r: &smelt::compeft::Report| compeft_card(r, &settings, &label, &base_label, &out);
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
        Cmd::Lora(cmd) => run_lora(cmd),
        Cmd::Devices => {
            let list = list_adapters();
            if list.is_empty() {
                println!("no GPU adapters found; smelt will run on the CPU");
            }
            for a in list {
                println!("{a}");
            }
            Ok(())
        }
        Cmd::Methods { name } => {
            let list: Vec<_> = match &name {
                Some(n) => vec![methods::find(n).with_context(|| {
                    let hint = methods::suggest(n)
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default();
                    format!("unknown method `{n}`{hint}")
                })?],
                None => methods::all().iter().collect(),
            };
            let mut o = std::io::stdout().lock();
            for m in list {
                writeln!(o, "{} — {}", m.name, m.pretty)?;
                writeln!(o, "  {}", m.summary)?;
                writeln!(o, "  paper: {}", m.reference)?;
                writeln!(
                    o,
                    "  base model: {}",
                    match m.base {
                        methods::BasePolicy::Required => "required",
                        methods::BasePolicy::Optional =>
                            "optional (merges task vectors when given)",
                        methods::BasePolicy::Ignored => "not used",
                    }
                )?;
                for p in &m.params {
                    let scope = match p.scope {
                        Scope::Shared => "global",
                        Scope::Input => "per model",
                        Scope::NonBase => "per model (not the base)",
                    };
                    let def = match p.default {
                        Default::Required => "required".to_string(),
                        Default::Unset => "unset".to_string(),
                        Default::Float(x) => format!("default {x}"),
                        Default::Bool(b) => format!("default {b}"),
                    };
                    writeln!(
                        o,
                        "    {:<10} {:<7} {:<26} {:<14} {}",
                        p.name,
                        p.kind.to_string(),
                        scope,
                        def,
                        p.help
                    )?;
                }
                writeln!(o)?;
            }
            Ok(())
        }
        Cmd::Inspect { model, all } => {
            let label = model.display().to_string();
            let m = ModelFolder::open(&model, &label)?;
            let mut o = std::io::stdout().lock();
            let params: usize = m.names().iter().map(|n| m.get(n).unwrap().numel()).sum();
            writeln!(
                o,
                "{}: {} tensors in {} file{}, {} parameters, {}",
                label,
                m.names().len(),
                m.files().len(),
                if m.files().len() == 1 { "" } else { "s" },
                units::count(params as u64),
                units::bytes(m.total_bytes())
            )?;
            if let Some(arch) = m
                .config
                .as_ref()
                .and_then(|c| c.get("architectures"))
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str())
            {
                writeln!(o, "architecture: {arch}")?;
            }
            let shown = if all {
                m.names().len()
            } else {
                m.names().len().min(50)
            };
            for n in &m.names()[..shown] {
                let t = m.get(n).unwrap();
                writeln!(
                    o,
                    "  {:<60} {:<5} {:?}",
                    n,
                    t.dtype().to_string(),
                    t.shape()
                )?;
            }
            if shown < m.names().len() {
                writeln!(
                    o,
                    "  ... {} more (--all lists them)",
                    m.names().len() - shown
                )?;
            }
            Ok(())
        }
    }
}

fn run_lora(cmd: LoraCmd) -> anyhow::Result<()> {
    match cmd {
        LoraCmd::Apply {
            base,
            adapter,
            out,
            force,
            out_shard_size,
            device,
        } => {
            let shard = parse_size(&out_shard_size)
                .map_err(anyhow::Error::msg)
                .context("--out-shard-size")?;
            // The equivalent recipe; it is also what the model card records.
            let model = format!("{}+{}", base.display(), adapter.display());
            let text = format!(
                "# smelt lora apply\nmerge_method: passthrough\nmodels:\n  - model: {}\n",
                serde_json::to_string(&model)?
            );
            let recipe = Recipe::parse(&text, std::path::Path::new("lora-apply.yml"))?;
            let plan = Plan::build(recipe, None)?;
            let report = execute_fresh(&plan, &device, out, force, shard)?;
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
        LoraCmd::Merge {
            adapters,
            method,
            weights,
            density,
            majority_sign,
            svd_rank,
            svd_clamp,
            rank,
            seed,
            out,
            force,
            device,
        } => {
            use smelt::lora::merge::{self, Combination, MajoritySign, MergeOptions};
            let opened: Vec<Adapter> = adapters
                .iter()
                .map(|p| Ok(Adapter::open(p, &p.display().to_string())?))
                .collect::<anyhow::Result<_>>()?;
            let refs: Vec<&Adapter> = opened.iter().collect();
            let weights = weights.unwrap_or_else(|| vec![1.0; opened.len()]);
            if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
                bail!("--weights: {w} is not a finite number");
            }
            if rank.is_some() && method != "lego" {
                bail!("--rank is the cluster count of lego; the SVD methods take --svd-rank");
            }
            if method == "lego" && (density.is_some() || svd_rank.is_some()) {
                bail!("lego takes --weights, --rank and --seed; --density and --svd-rank do not apply");
            }
            let combination = Combination::from_name(&method);
            if svd_rank.is_some() && !combination.is_some_and(|c| c.is_svd()) {
                bail!("--svd-rank applies to the SVD methods only, not {method}");
            }
            if svd_rank == Some(0) {
                bail!("--svd-rank must be at least 1");
            }
            if let Some(q) = svd_clamp {
                if !combination.is_some_and(|c| c.is_svd()) {
                    bail!("--svd-clamp applies to the SVD methods only, not {method}");
                }
                if !(q > 0.0 && q <= 1.0) {
                    bail!("--svd-clamp {q} is not a quantile in (0, 1]");
                }
            }
            let backend = make_backend(&device)?;
            let merged = match combination {
                None => smelt::lora::lego::lego(&refs, &weights, rank, seed, backend.as_ref())?,
                Some(combination) => merge::merge(
                    &refs,
                    &MergeOptions {
                        combination,
                        weights: weights.clone(),
                        density,
                        majority_sign: if majority_sign == "frequency" {
                            MajoritySign::Frequency
                        } else {
                            MajoritySign::Total
                        },
                        svd_rank,
                        svd_clamp,
                        seed,
                        masks: None,
                    },
                    backend.as_ref(),
                )?,
            };
            for w in &merged.warnings {
                log::warn!("{w}");
            }
            let mut card = format!(
                "---\nlibrary_name: peft\ntags:\n- lora\n- smelt\n- {method}\n---\n\n# {}\n\n\
                 LoRA adapter merged with smelt {} using `{method}` (PEFT's `add_weighted_adapter` semantics).\n\n\
                 | adapter | weight |\n|---|---|\n",
                out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
                env!("CARGO_PKG_VERSION")
            );
            for (a, w) in opened.iter().zip(&weights) {
                card.push_str(&format!("| `{}` | {w} |\n", a.label));
            }
            card.push_str(&format!(
                "\nrank {}, lora_alpha {}, {} modules",
                merged.rank,
                merged.rank,
                merged.modules.len()
            ));
            if let Some(d) = density {
                card.push_str(&format!(", density {d}"));
            }
            if let Some(q) = svd_clamp {
                card.push_str(&format!(", svd_clamp {q}"));
            }
            if combination.is_none_or(|c| c.is_random()) {
                card.push_str(&format!(", seed {seed}"));
            }
            card.push('\n');
            let dir = smelt::lora::write::write_adapter(
                &out,
                force,
                &merged.config,
                &merged.tensors(),
                opened[0].dtype(),
                &card,
            )?;
            println!(
                "merged {} adapters with {method} into {} (rank {}, {} modules) on {}",
                opened.len(),
                dir.display(),
                merged.rank,
                merged.modules.len(),
                backend.name()
            );
            Ok(())
        }
        LoraCmd::Extract {
            base,
            tuned,
            rank,
            out,
            force,
            device,
        } => {
            let b = ModelFolder::open(&base, &base.display().to_string())?;
            let t = ModelFolder::open(&tuned, &tuned.display().to_string())?;
            let backend = make_backend(&device)?;
            let ex = smelt::lora::extract::extract(&b, &t, rank, backend.as_ref())?;
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
                out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
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
    }
}

fn compeft_card(
    r: &smelt::compeft::Report,
    s: &smelt::compeft::Settings,
    model: &str,
    base: &str,
    out: &std::path::Path,
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

/// Runs a plan built by a command (not a recipe the user resumes) into a fresh OUT: the
/// device's backend with the CPU as fallback under auto, Ctrl-C handled, BLAKE3 manifest.
fn execute_fresh(
    plan: &Plan,
    device: &DeviceArgs,
    out: PathBuf,
    force: bool,
    shard: u64,
) -> anyhow::Result<exec::Report> {
    let backend = make_backend(device)?;
    let cpu = Cpu::new();
    let fallback: Option<&dyn Backend> = (device.device == DeviceChoice::Auto).then_some(&cpu);
    install_stop_handler();
    Ok(exec::execute(
        plan,
        backend.as_ref(),
        &ExecOptions {
            out_dir: out,
            start: Start::Fresh { force },
            max_shard_bytes: shard,
            progress: true,
            allow_nonfinite: false,
            fallback,
            hash: HashAlgo::Blake3,
            fsync: false,
        },
    )?)
}

/// The share of a merge's time in dense linear algebra (TSV-M, OPCM, LoRA ΔW), when any.
fn print_linalg(r: &exec::Report) {
    let l = &r.linalg;
    if l.svd_calls + l.matmul_calls == 0 {
        return;
    }
    let pct = |s: f64| 100.0 * s / r.seconds.max(1e-9);
    println!(
        "linear algebra: {} SVDs {:.2} s ({:.1}% of the merge), {} other matrix products {:.2} s ({:.1}%)",
        l.svd_calls,
        l.svd_seconds,
        pct(l.svd_seconds),
        l.matmul_calls,
        l.matmul_seconds,
        pct(l.matmul_seconds)
    );
}
