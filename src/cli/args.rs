//! Typed arguments shared by several commands: sizes, the manifest hash, the device choice,
//! and the backend that a device choice makes.

use std::str::FromStr;

use smelt::backend::cpu::Cpu;
use smelt::backend::gpu::{Gpu, GpuOptions};
use smelt::backend::Backend;
use smelt::io::writer::{parse_size, HashAlgo};

/// A size with an optional unit (5GB, 500MB, 2GiB, 16M), as `smelt::io::writer::parse_size`
/// reads it. Clap parses it, so a bad value is reported against the flag that carried it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(ByteSize)
    }
}

/// An output shard size (`--out-shard-size`): smelt's units (5GB, 500MB, 2GiB, a plain number
/// of bytes) and mergekit's counts, which read a bare `B` as *billion*: `5B` is 5e9 bytes,
/// as in `mergekit-yaml --out-shard-size 5B`, not five bytes. `K` and `M` (thousand, million)
/// mean the same in both. Write a plain number for a size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSize(pub u64);

impl ShardSize {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ShardSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        // mergekit's `parse_kmb`: a whole number followed by one `b`/`B` is billions
        if let Some(num) = t.strip_suffix(['b', 'B']) {
            let num = num.trim();
            if !num.is_empty() && num.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
                let x: f64 = num
                    .parse()
                    .map_err(|_| format!("{s:?} is not a size (try 5GB, 500MB, 2GiB, 5B)"))?;
                let v = x * 1e9;
                if !(1.0..1.8e19).contains(&v) {
                    return Err(format!(
                        "size {s:?} must be at least one byte and below 18 EB"
                    ));
                }
                return Ok(ShardSize(v as u64));
            }
        }
        parse_size(s).map(ShardSize)
    }
}

// The variants carry no doc comments: with help text on them clap would render the possible
// values of `--help` as a list instead of the one-line `[possible values: ...]`.

/// The hash the manifest records (`merge --hash`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HashChoice {
    Blake3,
    Sha256,
}

impl From<HashChoice> for HashAlgo {
    fn from(h: HashChoice) -> Self {
        match h {
            HashChoice::Blake3 => HashAlgo::Blake3,
            HashChoice::Sha256 => HashAlgo::Sha256,
        }
    }
}

/// Where one command's math runs (`--device` of merge, continual, compress and lora).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Auto,
    // mergekit's `--device cuda` (and `cuda:0`-style names are not accepted: use --adapter)
    #[value(alias = "cuda")]
    Gpu,
    Cpu,
}

/// Which backends `smelt bench` measures: `all` is the CPU and every GPU adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchDevices {
    All,
    Cpu,
    Gpu,
}

impl BenchDevices {
    pub fn cpu(self) -> bool {
        self != BenchDevices::Gpu
    }
    pub fn gpus(self) -> bool {
        self != BenchDevices::Cpu
    }
}

#[derive(clap::Args)]
pub struct DeviceArgs {
    /// Where the math runs: `auto` uses a GPU when one works (not a software Vulkan renderer
    /// such as lavapipe unless --adapter names it) and says so when it falls back to the CPU;
    /// `gpu` fails if no GPU can be used (mergekit's `cuda` is accepted for it); `cpu` never
    /// touches the GPU.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// GPU adapter to use: an index or part of a name from `smelt devices`.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Bytes of a tensor's inputs the GPU may keep resident (e.g. 4GiB); larger tensors stream
    /// through in tiles. Default 2GiB.
    #[arg(long)]
    pub vram_budget: Option<ByteSize>,
}

impl DeviceArgs {
    /// Under `--device auto` a GPU that fails mid-merge hands the rest to the CPU.
    pub fn cpu_fallback(&self) -> bool {
        self.device == DeviceChoice::Auto
    }
}

/// The backend `--device`/`--adapter`/`--vram-budget` ask for.
pub fn make_backend(d: &DeviceArgs) -> anyhow::Result<Box<dyn Backend>> {
    if d.device == DeviceChoice::Cpu {
        return Ok(Box::new(Cpu::new()));
    }
    let opts = GpuOptions {
        adapter: d.adapter.clone(),
        vram_budget: d.vram_budget.map(ByteSize::get),
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

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Cmd};

    fn merge(extra: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["smelt", "merge", "r.yml", "-o", "out"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv)
    }

    #[test]
    fn sizes_read_as_parse_size_reads_them() {
        assert_eq!("5GB".parse(), Ok(ByteSize(5_000_000_000)));
        assert_eq!("2GiB".parse(), Ok(ByteSize(2 << 30)));
        assert_eq!("16M".parse(), Ok(ByteSize(16_000_000)));
        assert_eq!("0".parse::<ByteSize>(), Err(parse_size("0").unwrap_err()));
    }

    #[test]
    fn shard_sizes_read_a_bare_b_as_mergekits_billion() {
        let sz = |s: &str| s.parse::<ShardSize>().map(ShardSize::get);
        assert_eq!(sz("1B"), Ok(1_000_000_000));
        assert_eq!(sz("5b"), Ok(5_000_000_000));
        assert_eq!(sz("0.5B"), Ok(500_000_000));
        // smelt's units keep their meaning, K and M agree with mergekit's
        assert_eq!(sz("5GB"), Ok(5_000_000_000));
        assert_eq!(sz("2GiB"), Ok(2 << 30));
        assert_eq!(sz("500M"), Ok(500_000_000));
        assert_eq!(sz("40KB"), Ok(40_000));
        assert_eq!(sz("40K"), Ok(40_000));
        assert_eq!(sz("1000"), Ok(1000));
        assert!(sz("0B").unwrap_err().contains("at least one byte"));
        assert!(sz("B").is_err());
        assert!(sz("99999999999B").is_err());
    }

    #[test]
    fn a_bad_size_is_a_usage_error_that_names_its_flag() {
        for (flag, value) in [("--out-shard-size", "5XB"), ("--vram-budget", "abc")] {
            let e = merge(&[flag, value]).err().expect("refused");
            assert_eq!(e.kind(), ErrorKind::ValueValidation);
            let msg = e.to_string();
            assert!(msg.contains(flag) && msg.contains(value), "{msg}");
        }
    }

    #[test]
    fn defaults_and_choices_reach_the_library_types() {
        let Cmd::Merge(a) = merge(&[]).unwrap().cmd else {
            panic!("not merge")
        };
        assert_eq!(a.out_shard_size, ShardSize(5_000_000_000));
        assert_eq!(HashAlgo::from(a.hash), HashAlgo::Blake3);
        assert_eq!(a.device.device, DeviceChoice::Auto);
        assert_eq!(a.device.vram_budget, None);
        let Cmd::Merge(a) = merge(&[
            "--hash",
            "sha256",
            "--device",
            "cpu",
            "--vram-budget",
            "4GiB",
        ])
        .unwrap()
        .cmd
        else {
            panic!("not merge")
        };
        assert_eq!(HashAlgo::from(a.hash), HashAlgo::Sha256);
        assert_eq!(a.device.device, DeviceChoice::Cpu);
        assert_eq!(a.device.vram_budget, Some(ByteSize(4 << 30)));
        let Cmd::Bench(b) = Cli::try_parse_from(["smelt", "bench"]).unwrap().cmd else {
            panic!("not bench")
        };
        assert_eq!(b.device, BenchDevices::All);
        assert!(b.device.cpu() && b.device.gpus());
        assert_eq!(b.elements, ByteSize(16_000_000));
    }
}
