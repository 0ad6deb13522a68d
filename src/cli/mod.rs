//! The `smelt` command line: the clap definitions of the commands, and one module per
//! command with its arguments and its `run`.
//!
//! Each command's one-line and long help sits on its variant of [`Cmd`] (clap renders both
//! from there); its flags sit on the `XArgs` struct of its module. Arguments shared by several
//! commands (sizes, devices, the hash) are typed in [`args`], so clap parses and checks them.

pub mod args;
pub mod bench;
pub mod compress;
pub mod continual;
pub mod devices;
mod execute;
pub mod inspect;
pub mod lora;
pub mod merge;
pub mod methods;
pub mod verify;

use clap::{Parser, Subcommand};

use lora::LoraCmd;

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
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Merge models as a recipe says.
    #[command(
        long_about = "Merge models as a recipe says.\n\n\
        The recipe is mergekit's YAML (merge_method, base_model, models or slices, parameters, \
        dtype, out_dtype, tokenizer_source) plus smelt's `seed`. A model is a local folder \
        (a relative path is looked up in the recipe's folder, then the current folder), one \
        .safetensors or PyTorch .bin file, or a Hugging Face Hub id (org/name or \
        org/name@revision), taken from the Hugging Face cache or downloaded into it \
        (HF_HUB_OFFLINE=1: the cache only). Everything that can be checked from file headers is checked before any \
        tensor is read; --dry-run stops there and prints the plan.\n\n\
        The output is written to a hidden temporary folder beside OUT and renamed into place \
        only when complete.",
        after_help = "Example:\n  smelt merge assets/recipes/ties.yml -o merged --dry-run\n  smelt merge assets/recipes/ties.yml -o merged\n  smelt merge config.yml ./merged --cuda --allow-crimes   # mergekit-yaml's command line"
    )]
    Merge(merge::MergeArgs),
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
    Continual(continual::ContinualArgs),
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
    Compress(compress::CompressArgs),
    /// List the GPU adapters smelt can use (name, vendor, backend, type, driver, limits).
    Devices,
    /// Measure every primitive and method on generated data, on the CPU and every usable
    /// GPU, against this machine's memory-copy (and host-device copy) bandwidth.
    #[command(after_help = "Example:\n  smelt bench --elements 64M --json bench.json")]
    Bench(bench::BenchArgs),
    /// Check a merged folder: re-hash every file against its manifest, and the shards
    /// against the index.
    Verify(verify::VerifyArgs),
    /// List the merge methods with their parameters and defaults.
    Methods(methods::MethodsArgs),
    /// Show a model folder's tensors, dtypes, shapes and size.
    Inspect(inspect::InspectArgs),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_definitions_hold_together() {
        super::Cli::command().debug_assert();
    }
}
