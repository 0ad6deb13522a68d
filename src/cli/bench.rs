//! `smelt bench`: every primitive and method on generated data, on the CPU and every GPU.

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use smelt::backend::cpu::Cpu;
use smelt::backend::gpu::{list_adapters, Gpu, GpuContext, GpuOptions};
use smelt::backend::Backend;
use smelt::bench;

use super::args::{BenchDevices, ByteSize};

/// What `--only` keeps (no doc comments on the variants: they would change `--help`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    Primitives,
    Methods,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Elements per input tensor (e.g. 16M, 64M).
    #[arg(long, default_value = "16M")]
    pub elements: ByteSize,
    /// Fine-tuned models besides the base.
    #[arg(long, default_value_t = 3)]
    pub models: usize,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Which backends: all (CPU and every GPU adapter), cpu, or gpu.
    #[arg(long, value_enum, default_value = "all")]
    pub device: BenchDevices,
    /// Only primitives or only methods.
    #[arg(long, value_enum)]
    pub only: Option<Only>,
    /// Also write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let BenchArgs {
        elements,
        models,
        repeats,
        device,
        only,
        json,
    } = args;
    // The size suffixes count elements here (16M = 16 000 000).
    let elements = elements.get() as usize;
    let mut backends: Vec<(Box<dyn Backend>, bench::Device)> = Vec::new();
    if device.cpu() {
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
    if device.gpus() {
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
        if device == BenchDevices::Gpu && backends.is_empty() {
            bail!("no usable GPU adapter");
        }
    }
    let report = bench::run(
        &bench::BenchOptions {
            elements,
            models,
            repeats,
            primitives: only != Some(Only::Methods),
            methods: only != Some(Only::Primitives),
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
