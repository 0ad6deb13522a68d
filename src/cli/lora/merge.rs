//! `smelt lora merge`: LoRA adapters merged into one (PEFT's `add_weighted_adapter`, and lego).

use std::path::PathBuf;

use anyhow::bail;

use smelt::io::guard::{claim_output, Protected};
use smelt::io::writer::Start;
use smelt::lora::merge::{self, Combination, MajoritySign, MergeOptions};
use smelt::lora::Adapter;

use crate::cli::args::{make_backend, DeviceArgs};

/// `--majority-sign` (no doc comments on the variants: they would change `--help`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MajoritySignArg {
    Total,
    Frequency,
}

impl From<MajoritySignArg> for MajoritySign {
    fn from(m: MajoritySignArg) -> Self {
        match m {
            MajoritySignArg::Total => MajoritySign::Total,
            MajoritySignArg::Frequency => MajoritySign::Frequency,
        }
    }
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// Two or more PEFT LoRA adapter folders or Hub ids (one is allowed; it is rescaled by
    /// its weight).
    #[arg(required = true)]
    pub adapters: Vec<PathBuf>,
    /// How to combine them.
    #[arg(long, value_parser = [
        "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd",
        "dare_ties", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd", "lego"])]
    pub method: String,
    /// One weight per adapter, comma-separated (e.g. 0.7,0.3). Default: 1 for each.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub weights: Option<Vec<f64>>,
    /// Fraction of elements kept by the pruning methods (ties, dare_*, magnitude_prune*).
    #[arg(long)]
    pub density: Option<f64>,
    /// Sign election of ties and dare_ties: total (sign of the sum) or frequency (majority
    /// of the signs).
    #[arg(long, value_enum, default_value = "total")]
    pub majority_sign: MajoritySignArg,
    /// Rank of the result of the SVD methods (default: the largest input rank).
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// SVD methods: clamp the re-factored B' and A' to ±their Q-quantile (PEFT's
    /// svd_clamp; Q in (0, 1], computed per module over both factors' values).
    #[arg(long, value_name = "Q")]
    pub svd_clamp: Option<f64>,
    /// Rank of the result of lego: the number of clusters (default: the largest input rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Seed of the DARE draws and of lego's k-means seeding.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let MergeArgs {
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
    } = args;
    let opened: Vec<Adapter> = adapters
        .iter()
        .map(|p| {
            let dir = smelt::hub::resolve_arg(p, "adapter")?;
            Ok(Adapter::open(&dir, &p.display().to_string())?)
        })
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
    // held until the adapter is in place: no other smelt writes OUT meanwhile
    let protected: Vec<Protected> = opened
        .iter()
        .map(|a| Protected::input("adapter", &a.dir))
        .collect();
    let _lock = claim_output(&out, &protected, Start::Fresh { force }, false)?;
    let backend = make_backend(&device)?;
    let merged = match combination {
        None => smelt::lora::lego::lego(&refs, &weights, rank, seed, backend.as_ref())?,
        Some(combination) => merge::merge(
            &refs,
            &MergeOptions {
                combination,
                weights: weights.clone(),
                density,
                majority_sign: majority_sign.into(),
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
