//! `smelt bench`: every primitive and every method on generated data, on every backend,
//! reported as GB/s and as a fraction of what this machine can move.
//!
//! The yardsticks are measured in the same run: the memory-copy bandwidth (bytes read and
//! written per second by a parallel copy), and on GPUs the host-to-device and device-to-host
//! copy bandwidths. A primitive or method "moves" its inputs once and its output once; its
//! GB/s is those bytes over its wall time (the median of several runs, each on a fresh job
//! so that GPU uploads are counted).

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::{
    Backend, Consensus, GtaSpec, Input, Job, Keep, Query, RowLayout, Segments, Source, Sparsity,
    Vector, Vote,
};
use crate::dtype::{self, DType};
use crate::error::Result;
use crate::methods::Value1;
use crate::methods::{self, Ctx, Params};

pub struct BenchOptions {
    /// Elements per input tensor.
    pub elements: usize,
    /// Inputs besides the base.
    pub models: usize,
    pub repeats: usize,
    pub primitives: bool,
    pub methods: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct Device {
    pub backend: String,
    pub adapter: String,
    pub vendor: String,
    pub api: String,
    pub driver: String,
    pub device_type: String,
    /// GPU only: host-to-device and device-to-host copy bandwidth, GB/s.
    pub upload_gbps: Option<f64>,
    pub download_gbps: Option<f64>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Row {
    pub backend: String,
    pub kind: &'static str,
    pub name: String,
    pub bytes: u64,
    pub seconds: f64,
    pub gbps: f64,
    /// GB/s over the memory-copy bandwidth.
    pub of_memcpy: f64,
    /// GPU only: GB/s over the slower of the two host-device copy directions.
    pub of_transfer: Option<f64>,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub smelt_version: &'static str,
    pub git_hash: &'static str,
    pub cpu: String,
    pub threads: usize,
    pub elements: usize,
    pub models: usize,
    pub dtype: &'static str,
    pub memcpy_gbps: f64,
    pub devices: Vec<Device>,
    pub rows: Vec<Row>,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Bytes read and written per second by a parallel copy of `bytes`.
pub fn memcpy_bandwidth(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let chunk = (bytes / (4 * rayon::current_num_threads())).max(1 << 20);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * bytes as f64 / best / 1e9
}

/// Deterministic bf16 data: a base and fine-tunes around it.
fn generate(n: usize, models: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let values = |seed: u64, scale: f32| -> Vec<f32> {
        (0..n)
            .into_par_iter()
            .map(|i| {
                let mut z = (i as u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .wrapping_add(0xD1B5_4A32_D192_ED03);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    };
    let to_bf16 = |v: &[f32]| {
        let mut b = vec![0u8; v.len() * 2];
        b.par_chunks_mut(1 << 16)
            .zip(v.par_chunks(1 << 15))
            .for_each(|(o, x)| dtype::encode(DType::BF16, x, o));
        b
    };
    let base = values(1, 0.1);
    let shared = values(2, 0.004);
    let fts = (0..models)
        .map(|m| {
            let own = values(10 + m as u64, 0.006);
            let v: Vec<f32> = (0..n)
                .into_par_iter()
                .map(|i| base[i] + shared[i] + own[i])
                .collect();
            to_bf16(&v)
        })
        .collect();
    (to_bf16(&base), fts)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `f` (which builds its own job each run) `repeats` times.
fn time(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// Parameters the benchmarked methods run with: every required parameter filled from its
/// kind and scope (a model's share 1/k, a global 0.5, booleans on), density 0.5 where a
/// method has it, and the values a few methods are timed at in place of those.
fn method_params(m: &methods::MethodInfo, k: usize) -> Params {
    let f = Value1::Float;
    let mut set: Vec<(&str, Value1)> = match m.name {
        "nearswap" => vec![("t", f(0.001))],
        "slerp" => vec![("t", f(0.3))],
        "sce" => vec![("select_topk", f(0.5))],
        _ => vec![("weight", f(1.0 / k as f64)), ("density", f(0.5))],
    };
    for p in m
        .params
        .iter()
        .filter(|p| p.default == methods::Default::Required)
    {
        if set.iter().all(|(n, _)| *n != p.name) {
            let v = match (p.kind, p.scope) {
                (methods::Kind::Bool, _) => Value1::Bool(true),
                (_, methods::Scope::Shared) => f(0.5),
                _ => f(1.0 / k as f64),
            };
            set.push((p.name, v));
        }
    }
    Params::for_method(m, k, &set)
}

pub fn run(opts: &BenchOptions, backends: &[(Box<dyn Backend>, Device)]) -> Result<Report> {
    let n = opts.elements.max(4096) / 4096 * 4096;
    let k = opts.models.max(2);
    let memcpy = memcpy_bandwidth((n * 4).clamp(64 << 20, 1 << 30));
    let (base, models) = generate(n, k);
    let shape = [n / 4096, 4096];
    let rows = RowLayout::along_dim1(&shape);
    let name = "model.layers.0.mlp.up_proj.weight";
    let job = |with_base: bool, count: usize, out: DType| {
        Job::new(
            name,
            with_base.then_some(Input {
                bytes: &base,
                dtype: DType::BF16,
            }),
            models[..count]
                .iter()
                .map(|b| Input {
                    bytes: b,
                    dtype: DType::BF16,
                })
                .collect(),
            DType::F32,
            out,
        )
    };
    let (inb, outb) = (2 * n as u64, 2 * n as u64);
    let mut rows_out = Vec::new();
    for (b, dev) in backends {
        let transfer = match (dev.upload_gbps, dev.download_gbps) {
            (Some(u), Some(d)) => Some(u.min(d)),
            _ => None,
        };
        let mut push = |kind: &'static str, name: String, bytes: u64, seconds: f64| {
            let gbps = bytes as f64 / seconds / 1e9;
            rows_out.push(Row {
                backend: dev.backend.clone(),
                kind,
                name,
                bytes,
                seconds,
                gbps,
                of_memcpy: gbps / memcpy,
                of_transfer: transfer.map(|t| gbps / t),
            });
        };
        let mut out = vec![0u8; n * 2];
        if opts.primitives {
            let r = opts.repeats;
            let t = time(r, || b.convert(&job(false, 1, DType::BF16), &mut out))?;
            push("primitive", "convert bf16".into(), inb + outb, t);
            let w: Vec<f32> = vec![1.0 / k as f32; k];
            let t = time(r, || {
                b.weighted_sum(&job(false, k, DType::BF16), &w, Some(1.0), &mut out)
            })?;
            push(
                "primitive",
                format!("weighted_sum x{k}"),
                k as u64 * inb + outb,
                t,
            );
            let qs: Vec<Query> = (0..k)
                .map(|i| Query {
                    source: Source::Delta(i),
                    k: n as u64 / 2,
                })
                .collect();
            let t = time(r, || b.select(&job(true, k, DType::BF16), &qs).map(|_| ()))?;
            push("primitive", format!("select x{k}"), (k as u64 + 1) * inb, t);
            let cuts = b.select(&job(true, k, DType::BF16), &qs)?;
            let random = Sparsity::new(vec![Keep::Random { p: 0.5 }; k], 1);
            let t = time(r, || {
                b.masked_sums(&job(true, k, DType::BF16), &random, true)
                    .map(|_| ())
            })?;
            push(
                "primitive",
                format!("masked_sums x{k}"),
                (k as u64 + 1) * inb,
                t,
            );
            let gta = |sp: Sparsity, consensus| GtaSpec {
                weights: vec![1.0; k],
                sparsity: sp,
                scale: vec![1.0; k],
                consensus,
                vote: Vote::Weighted,
                normalize: true,
                div_floor: None,
                lambda: 1.0,
            };
            let ties = gta(
                Sparsity::new(cuts.iter().map(|c| Keep::top(*c)).collect(), 1),
                Consensus::Sum,
            );
            let t = time(r, || b.gta(&job(true, k, DType::BF16), &ties, &mut out))?;
            push(
                "primitive",
                "gta (ties keep)".into(),
                (k as u64 + 1) * inb + outb,
                t,
            );
            let dare = gta(random.clone(), Consensus::None);
            let t = time(r, || b.gta(&job(true, k, DType::BF16), &dare, &mut out))?;
            push(
                "primitive",
                "gta (random keep)".into(),
                (k as u64 + 1) * inb + outb,
                t,
            );
            let della = gta(
                Sparsity {
                    keep: vec![Keep::Della { rows, table: 0 }; k],
                    tables: vec![methods::della_table(0.5, 0.15, rows.len)],
                    seed: 1,
                },
                Consensus::Sum,
            );
            let t = time(r, || {
                b.gta(
                    &job(true, k, DType::BF16).with_align(rows.slab()),
                    &della,
                    &mut out,
                )
            })?;
            push(
                "primitive",
                "gta (della keep)".into(),
                (k as u64 + 1) * inb + outb,
                t,
            );
            let vecs: Vec<Vector> = (0..k).map(Vector::Delta).collect();
            let pairs: Vec<(usize, usize)> =
                (0..k).flat_map(|i| (i..k).map(move |j| (i, j))).collect();
            for seg in [Segments::Whole, Segments::Rows { len: 4096 }] {
                let t = time(r, || {
                    b.dots(
                        &job(true, k, DType::BF16).with_align(seg.align()),
                        &vecs,
                        &pairs,
                        seg,
                    )
                    .map(|_| ())
                })?;
                push(
                    "primitive",
                    format!("dots {seg:?}"),
                    (k as u64 + 1) * inb,
                    t,
                );
            }
            let mut terms: Vec<Vector> = (0..k).map(Vector::Model).collect();
            terms.push(Vector::Base);
            let coefs = vec![0.25f32; k + 1];
            let t = time(r, || {
                b.combine(
                    &job(true, k, DType::BF16),
                    &terms,
                    Segments::Whole,
                    &coefs,
                    &mut out,
                )
            })?;
            push(
                "primitive",
                format!("combine x{}", k + 1),
                (k as u64 + 1) * inb + outb,
                t,
            );
            let t = time(r, || {
                b.nearswap(&job(true, 1, DType::BF16), 0.001, &mut out)
            })?;
            push("primitive", "nearswap".into(), 2 * inb + outb, t);
            // dense linear algebra (TSV-M, OPCM, LoRA): a square product and a truncated SVD
            // of the size of a small model's projection; the name carries GFLOP/s
            let d = 512;
            let a = crate::linalg::Mat::from_fn(d, d, |i, j| ((i * 7 + j * 13) % 17) as f32 - 8.0);
            let c = crate::linalg::Mat::from_fn(d, d, |i, j| ((i * 5 + j * 3) % 11) as f32 - 5.0);
            let t = time(r, || b.matmul(&a, &c, false, false).map(|_| ()))?;
            let gflops = 2.0 * (d as f64).powi(3) / t / 1e9;
            push(
                "primitive",
                format!("matmul {d}x{d}x{d} ({gflops:.1} GFLOP/s)"),
                3 * (d * d * 4) as u64,
                t,
            );
            let (m, rank) = (1024, 32);
            let big = crate::linalg::Mat::from_fn(m, m, |i, j| {
                (((i * 31 + j * 17) % 97) as f32 - 48.0) / 48.0 + if i == j { 4.0 } else { 0.0 }
            });
            let t = time(r, || b.svd(&big, Some(rank)).map(|_| ()))?;
            push(
                "primitive",
                format!("svd {m}x{m} rank {rank}"),
                (m * m * 4) as u64,
                t,
            );
        }
        if opts.methods {
            for m in methods::all() {
                let (with_base, count) = match m.base {
                    methods::BasePolicy::Required | methods::BasePolicy::Optional => (true, k),
                    methods::BasePolicy::Ignored => (false, k),
                };
                let count = match m.models {
                    (lo, Some(hi)) => count.clamp(lo, hi),
                    (lo, None) => count.max(lo),
                };
                // Fisher merging reads a Fisher tensor per model besides its weights
                let per = m.inputs_per_model();
                let count = if per > 1 { (count / per).max(1) } else { count };
                let params = method_params(m, count);
                // whole-model statistics (Fisher norms, PCB's order statistics) of this
                // one-tensor model, outside the timing
                let globals = m.imp.whole_model(
                    b.as_ref(),
                    &|f| {
                        let j = job(with_base, count * per, DType::F32);
                        let r = f(&j, &params, &shape);
                        b.end_job(&j);
                        r
                    },
                    1,
                    None,
                )?;
                let t = time(opts.repeats, || {
                    let j = job(with_base, count * per, DType::BF16)
                        .with_align(m.imp.align(&params, &shape));
                    let cx = Ctx {
                        job: &j,
                        shape: &shape,
                        params: &params,
                        seed: 1,
                        depth: None,
                        globals: &globals,
                    };
                    let r = m.imp.run(b.as_ref(), &cx, &mut out);
                    b.end_job(&j);
                    r
                })?;
                let inputs = (count * per) as u64 + with_base as u64;
                push("method", m.name.to_string(), inputs * inb + outb, t);
            }
        }
    }
    Ok(Report {
        smelt_version: env!("CARGO_PKG_VERSION"),
        git_hash: env!("SMELT_GIT_HASH"),
        cpu: cpu_model(),
        threads: rayon::current_num_threads(),
        elements: n,
        models: k,
        dtype: "bf16 in, bf16 out, f32 compute",
        memcpy_gbps: memcpy,
        devices: backends.iter().map(|(_, d)| d.clone()).collect(),
        rows: rows_out,
    })
}

/// The report as a table for people.
pub fn table(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "smelt {} ({}) on {} ({} threads); {} elements x {} models + base, {}",
        r.smelt_version,
        r.git_hash,
        r.cpu,
        r.threads,
        crate::units::count(r.elements as u64),
        r.models,
        r.dtype
    );
    let _ = writeln!(s, "memory copy: {:.2} GB/s (read + written)", r.memcpy_gbps);
    for d in &r.devices {
        let _ = write!(
            s,
            "{}: {} ({} {}, {})",
            d.backend, d.adapter, d.api, d.device_type, d.driver
        );
        if let (Some(u), Some(dn)) = (d.upload_gbps, d.download_gbps) {
            let _ = write!(s, "; host->device {u:.2} GB/s, device->host {dn:.2} GB/s");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "\n{:<8} {:<10} {:<26} {:>10} {:>9} {:>8} {:>9}",
        "backend", "kind", "name", "ms", "GB/s", "of copy", "of xfer"
    );
    for row in &r.rows {
        let _ = writeln!(
            s,
            "{:<8} {:<10} {:<26} {:>10.2} {:>9.2} {:>7.0}% {:>9}",
            row.backend,
            row.kind,
            row.name,
            row.seconds * 1e3,
            row.gbps,
            row.of_memcpy * 100.0,
            row.of_transfer
                .map(|x| format!("{:.0}%", x * 100.0))
                .unwrap_or_default()
        );
    }
    s
}
