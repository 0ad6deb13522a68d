//! Throughput of the backend primitives on generated data, per backend (CPU and, when an
//! adapter exists, the GPU), with the device synchronised inside the timed region (every
//! GPU primitive returns only after its results are read back). Throughput counts the bytes
//! a primitive must move: inputs read once plus outputs written.
//!
//!     cargo bench --bench primitives            # all
//!     cargo bench --bench primitives -- gpu     # one backend

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smelt::backend::cpu::Cpu;
use smelt::backend::gpu::{Gpu, GpuContext, GpuOptions};
use smelt::backend::{
    Backend, Consensus, GtaSpec, Input, Job, Keep, Query, RowLayout, Segments, Source, Sparsity,
    Vector, Vote,
};
use smelt::dtype::{self, DType};

const N: usize = 4 << 20;
const MODELS: usize = 3;

fn data(seed: u32, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 0.1
        })
        .collect()
}

fn bf16(v: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; v.len() * 2];
    dtype::encode(DType::BF16, v, &mut b);
    b
}

fn backends() -> Vec<(String, Box<dyn Backend>)> {
    let mut v: Vec<(String, Box<dyn Backend>)> = vec![("cpu".into(), Box::new(Cpu::new()))];
    match GpuContext::new(None) {
        Ok(ctx) => {
            let name = format!("gpu {}", ctx.info.name);
            v.push((
                name,
                Box::new(Gpu::with_context(Arc::new(ctx), &GpuOptions::default())),
            ));
        }
        Err(e) => eprintln!("no GPU benchmarks: {e}"),
    }
    v
}

fn bench(c: &mut Criterion) {
    let base = bf16(&data(1, N));
    let models: Vec<Vec<u8>> = (0..MODELS as u32)
        .map(|i| {
            let b = data(1, N);
            let d = data(10 + i, N);
            bf16(
                &b.iter()
                    .zip(&d)
                    .map(|(x, y)| x + y * 0.1)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let inputs = |with_base: bool| -> Job {
        Job::new(
            "model.layers.0.mlp.up_proj.weight",
            with_base.then_some(Input {
                bytes: &base,
                dtype: DType::BF16,
            }),
            models
                .iter()
                .map(|b| Input {
                    bytes: b,
                    dtype: DType::BF16,
                })
                .collect(),
            DType::F32,
            DType::BF16,
        )
    };
    let in_bytes = |k: usize| (k * N * 2) as u64;
    let out_bytes = (N * 2) as u64;

    for (name, b) in backends() {
        let mut g = c.benchmark_group(format!("primitives/{name}"));
        g.sample_size(10);
        let mut out = vec![0u8; N * 2];

        let j = inputs(false);
        g.throughput(Throughput::Bytes(in_bytes(1) + out_bytes));
        g.bench_function(BenchmarkId::new("convert", "bf16"), |bn| {
            bn.iter(|| b.convert(&j, &mut out).unwrap())
        });
        g.throughput(Throughput::Bytes(in_bytes(MODELS) + out_bytes));
        g.bench_function(BenchmarkId::new("weighted_sum", MODELS), |bn| {
            bn.iter(|| {
                b.weighted_sum(&j, &[0.5, 0.3, 0.2], Some(1.0), &mut out)
                    .unwrap()
            })
        });
        b.end_job(&j);

        let j = inputs(true);
        let qs: Vec<Query> = (0..MODELS)
            .map(|i| Query {
                source: Source::Delta(i),
                k: N as u64 / 2,
            })
            .collect();
        // one histogram pass and one filtered pass over base + models
        g.throughput(Throughput::Bytes(2 * in_bytes(MODELS + 1)));
        g.bench_function(BenchmarkId::new("select", MODELS), |bn| {
            bn.iter(|| b.select(&j, &qs).unwrap())
        });
        let cuts = b.select(&j, &qs).unwrap();
        let top: Vec<Keep> = cuts.iter().map(|c| Keep::top(*c)).collect();
        let random = vec![Keep::Random { p: 0.5 }; MODELS];
        g.throughput(Throughput::Bytes(in_bytes(MODELS + 1)));
        let sp_random = Sparsity::new(random.clone(), 1);
        g.bench_function(BenchmarkId::new("masked_sums", MODELS), |bn| {
            bn.iter(|| b.masked_sums(&j, &sp_random, true).unwrap())
        });
        g.throughput(Throughput::Bytes(in_bytes(MODELS + 1) + out_bytes));
        for (label, keep, consensus) in [
            ("ties", &top, Consensus::Sum),
            ("dare_linear", &random, Consensus::None),
        ] {
            let spec = GtaSpec {
                weights: vec![1.0; MODELS],
                sparsity: Sparsity::new(keep.clone(), 1),
                scale: vec![1.0; MODELS],
                consensus,
                vote: Vote::Weighted,
                normalize: true,
                div_floor: None,
                lambda: 1.0,
            };
            g.bench_function(BenchmarkId::new("gta", label), |bn| {
                bn.iter(|| b.gta(&j, &spec, &mut out).unwrap())
            });
        }
        let vecs: Vec<Vector> = (0..MODELS).map(Vector::Delta).collect();
        let pairs: Vec<(usize, usize)> = (0..MODELS)
            .flat_map(|i| (i..MODELS).map(move |k| (i, k)))
            .collect();
        g.throughput(Throughput::Bytes(in_bytes(MODELS + 1)));
        g.bench_function(BenchmarkId::new("dots", "whole"), |bn| {
            bn.iter(|| b.dots(&j, &vecs, &pairs, Segments::Whole).unwrap())
        });
        let mut terms: Vec<Vector> = (0..MODELS).map(Vector::Model).collect();
        terms.push(Vector::Base);
        let coefs = vec![0.25f32; MODELS + 1];
        g.throughput(Throughput::Bytes(in_bytes(MODELS + 1) + out_bytes));
        g.bench_function(BenchmarkId::new("combine", "whole"), |bn| {
            bn.iter(|| {
                b.combine(&j, &terms, Segments::Whole, &coefs, &mut out)
                    .unwrap()
            })
        });
        b.end_job(&j);

        // DELLA: per-row ranks (a sort per row) then the random keep, rows of 4096
        let rows = RowLayout::along_dim1(&[N / 4096, 4096]);
        let j = inputs(true).with_align(rows.slab());
        let della = GtaSpec {
            weights: vec![1.0; MODELS],
            sparsity: Sparsity {
                keep: vec![Keep::Della { rows, table: 0 }; MODELS],
                tables: vec![smelt::methods::della_table(0.5, 0.15, rows.len)],
                seed: 1,
            },
            scale: vec![1.0; MODELS],
            consensus: Consensus::Sum,
            vote: Vote::Weighted,
            normalize: true,
            div_floor: None,
            lambda: 1.0,
        };
        g.bench_function(BenchmarkId::new("gta", "della"), |bn| {
            bn.iter(|| b.gta(&j, &della, &mut out).unwrap())
        });
        b.end_job(&j);
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
