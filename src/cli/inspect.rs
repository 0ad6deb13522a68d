//! `smelt inspect`: a model folder's tensors, dtypes, shapes and size.

use std::io::Write as _;
use std::path::PathBuf;

use smelt::io::model::ModelFolder;
use smelt::units;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A model folder, one .safetensors file, one PyTorch checkpoint (.bin), or a Hub id
    /// (org/name[@revision]).
    pub model: PathBuf,
    /// Print every tensor (default: the first 50).
    #[arg(short, long)]
    pub all: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let InspectArgs { model, all } = args;
    let label = model.display().to_string();
    let path = smelt::hub::resolve_arg(&model, "the model")?;
    let m = ModelFolder::open(&path, &label)?;
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
