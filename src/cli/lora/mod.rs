//! `smelt lora`: bake an adapter into its base, merge adapters, or extract one from a fine-tune.

pub mod apply;
pub mod extract;
pub mod merge;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum LoraCmd {
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
    Apply(apply::ApplyArgs),
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
    Merge(merge::MergeArgs),
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
    Extract(extract::ExtractArgs),
}

pub fn run(cmd: LoraCmd) -> anyhow::Result<()> {
    match cmd {
        LoraCmd::Apply(args) => apply::run(args),
        LoraCmd::Merge(args) => merge::run(args),
        LoraCmd::Extract(args) => extract::run(args),
    }
}
