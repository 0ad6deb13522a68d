//! `smelt devices`: the GPU adapters smelt can use.

use smelt::backend::gpu::list_adapters;

pub fn run() -> anyhow::Result<()> {
    let list = list_adapters();
    if list.is_empty() {
        println!("no GPU adapters found; smelt will run on the CPU");
    }
    for a in list {
        println!("{a}");
    }
    Ok(())
}
