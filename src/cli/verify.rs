//! `smelt verify`: re-hash a merged folder against its manifest and index.

use std::path::PathBuf;

use smelt::io::verify::verify;
use smelt::units;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A folder written by `smelt merge`.
    pub dir: PathBuf,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let dir = args.dir;
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
