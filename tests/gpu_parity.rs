//! The GPU kernels against the CPU path, primitive by primitive, on random tensors of awkward
//! sizes in all three dtypes, with whole-tensor tiles, with small tiles that force a tensor
//! across several tiles, and with a budget that forces streaming. Selections and random
//! masks must be identical; arithmetic within a few ulp.
//!
//! Needs a GPU adapter (lavapipe in CI). Without one the tests say so and pass, unless
//! SMELT_REQUIRE_GPU is set (as `.ci/run` does), in which case they fail.

mod common;

use common::{assert_close, Tol};
use smelt::backend::cpu::Cpu;
use smelt::backend::gpu::{Gpu, GpuOptions};
use smelt::backend::{Backend, Consensus, GtaSpec, Input, Job, Keep, Query, RankCut, Source};
use smelt::dtype::{self, DType};

const TILE: usize = 4096;
const SIZES: [usize; 7] = [1, 7, 255, 1024, TILE + 1, 3 * TILE + 5, 65537];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The GPU configurations every parity test runs: one tile per tensor (resident), forced
/// small tiles (resident), and forced small tiles streamed through two slots.
fn gpus() -> Vec<(&'static str, Gpu)> {
    let Some(ctx) = common::gpu_context() else {
        return Vec::new();
    };
    vec![
        (
            "whole",
            Gpu::with_context(ctx.clone(), &GpuOptions::default()),
        ),
        (
            "tiled",
            Gpu::with_context(
                ctx.clone(),
                &GpuOptions {
                    tile_elems: Some(TILE),
                    ..Default::default()
                },
            ),
        ),
        (
            "streamed",
            Gpu::with_context(
                ctx,
                &GpuOptions {
                    tile_elems: Some(TILE),
                    vram_budget: Some(1),
                    ..Default::default()
                },
            ),
        ),
    ]
}

/// Deterministic pseudo-random normals (splitmix64 + Box-Muller).
fn normals(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next().max(1e-300), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * scale
        })
        .collect()
}

fn encode(dt: DType, v: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; v.len() * dt.size()];
    dtype::encode(dt, v, &mut b);
    b
}

fn decode(dt: DType, b: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; b.len() / dt.size()];
    dtype::decode(dt, b, &mut v);
    v
}

/// Base + `m` fine-tunes (base + correlated deltas) of `n` elements in `dt`. With `ties`,
/// deltas are coarsely quantised so that many magnitudes are equal.
fn inputs(seed: u64, n: usize, m: usize, dt: DType, ties: bool) -> (Vec<u8>, Vec<Vec<u8>>) {
    let base = normals(seed, n, 1.0);
    let shared = normals(seed + 1, n, 0.05);
    let models = (0..m)
        .map(|i| {
            let own = normals(seed + 10 + i as u64, n, 0.05);
            let v: Vec<f32> = base
                .iter()
                .zip(&shared)
                .zip(&own)
                .map(|((b, s), o)| {
                    let mut d = s * 0.6 + o;
                    if ties {
                        d = (d * 64.0).round() / 64.0;
                    }
                    b + d
                })
                .collect();
            encode(dt, &v)
        })
        .collect();
    (encode(dt, &base), models)
}

fn job<'a>(
    name: &'a str,
    base: &'a [u8],
    models: &'a [Vec<u8>],
    dt: DType,
    load: DType,
    out: DType,
) -> Job<'a> {
    Job::new(
        name,
        Some(Input {
            bytes: base,
            dtype: dt,
        }),
        models
            .iter()
            .map(|b| Input {
                bytes: b,
                dtype: dt,
            })
            .collect(),
        load,
        out,
    )
}

/// Runs `f` on every (size, dtype, gpu config) with a fresh job each time.
fn each_case(mut f: impl FnMut(&str, &Gpu, usize, DType)) {
    let gpus = gpus();
    for (cfg, gpu) in &gpus {
        for &n in &SIZES {
            for &dt in &DTYPES {
                f(cfg, gpu, n, dt);
            }
        }
    }
}

#[test]
fn conversions_are_bit_exact() {
    // Every f16 and bf16 pattern except NaN, plus f32 edge values (subnormals, overflow to
    // f16 infinity, ties at the rounding boundary).
    let mut vals: Vec<f32> = Vec::new();
    for h in 0..=u16::MAX {
        for x in [dtype::f16_to_f32(h), dtype::bf16_to_f32(h)] {
            if !x.is_nan() {
                vals.push(x);
                vals.push(f32::from_bits(x.to_bits().wrapping_add(0x1000)));
                vals.push(f32::from_bits(x.to_bits().wrapping_add(0x8000)));
            }
        }
    }
    vals.extend([
        f32::MIN_POSITIVE / 3.0,
        65519.0,
        65520.0,
        1.0e-8,
        -3.0e-7,
        f32::INFINITY,
    ]);
    vals.retain(|x| !x.is_nan());
    let gpus = gpus();
    for (cfg, gpu) in &gpus {
        for src in DTYPES {
            let bytes = encode(src, &vals);
            for load in DTYPES {
                for out in DTYPES {
                    let j = Job::new(
                        "conv",
                        None,
                        vec![Input {
                            bytes: &bytes,
                            dtype: src,
                        }],
                        load,
                        out,
                    );
                    let mut a = vec![0u8; j.out_bytes()];
                    let mut b = vec![0u8; j.out_bytes()];
                    Cpu.convert(&j, &mut a).unwrap();
                    gpu.convert(&j, &mut b).unwrap();
                    if a != b {
                        let i = (0..vals.len())
                            .find(|&i| {
                                a[i * out.size()..(i + 1) * out.size()]
                                    != b[i * out.size()..(i + 1) * out.size()]
                            })
                            .unwrap();
                        panic!(
                            "[{cfg}] {src}->{out} (load {load}): element {i} ({:e}) differs: cpu {:?} gpu {:?}",
                            vals[i],
                            &a[i * out.size()..(i + 1) * out.size()],
                            &b[i * out.size()..(i + 1) * out.size()]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn selections_are_identical() {
    each_case(|cfg, gpu, n, dt| {
        for ties in [false, true] {
            let (base, models) = inputs(n as u64 * 7 + ties as u64, n, 3, dt, ties);
            let j = job("sel", &base, &models, dt, DType::F32, DType::F32);
            let n64 = n as u64;
            let mut qs = Vec::new();
            for src in [Source::Delta(0), Source::Delta(2), Source::Model(1)] {
                for k in [
                    0,
                    1,
                    2,
                    n64 / 3,
                    n64 / 2,
                    n64.saturating_sub(1),
                    n64,
                    n64 + 5,
                ] {
                    qs.push(Query { source: src, k });
                }
            }
            let a = Cpu.select(&j, &qs).unwrap();
            let b = gpu.select(&j, &qs).unwrap();
            assert_eq!(a, b, "[{cfg}] n={n} {dt} ties={ties}");
            // The cuts select exactly k elements (min(k, n)).
            let bd = decode(dt, &base);
            for (q, cut) in qs.iter().zip(&a) {
                let x = match q.source {
                    Source::Delta(i) | Source::Model(i) => decode(dt, &models[i]),
                };
                let kept = (0..n)
                    .filter(|&e| {
                        let v = match q.source {
                            Source::Delta(_) => x[e] - bd[e],
                            Source::Model(_) => x[e],
                        };
                        cut.below(v.abs().to_bits(), e as u32)
                    })
                    .count() as u64;
                assert_eq!(kept, q.k.min(n64), "[{cfg}] n={n} {dt} {q:?}");
            }
        }
    });
}

fn keeps(cpu_cuts: &[RankCut], m: usize, variant: usize) -> Vec<Keep> {
    (0..m)
        .map(|i| match (variant + i) % 5 {
            0 => Keep::All,
            1 => Keep::top(cpu_cuts[i]),
            2 => Keep::Random { p: 0.3 },
            3 => Keep::Ranks {
                lo: cpu_cuts[m + i],
                hi: cpu_cuts[i],
            },
            _ => Keep::Nothing,
        })
        .collect()
}

#[test]
fn gta_and_norms_match() {
    each_case(|cfg, gpu, n, dt| {
        let m = 3;
        let (base, models) = inputs(n as u64 * 13, n, m, dt, false);
        for (out, load) in [
            (DType::F32, DType::F32),
            (dt, DType::F32),
            (DType::BF16, DType::BF16),
        ] {
            let j = job(
                "model.layers.3.mlp.up_proj.weight",
                &base,
                &models,
                dt,
                load,
                out,
            );
            let n64 = n as u64;
            let mut qs: Vec<Query> = (0..m)
                .map(|i| Query {
                    source: Source::Delta(i),
                    k: n64 / 2 + 1,
                })
                .collect();
            qs.extend((0..m).map(|i| Query {
                source: Source::Delta(i),
                k: n64 / 10,
            }));
            let cuts = Cpu.select(&j, &qs).unwrap();
            for variant in 0..5 {
                let keep = keeps(&cuts, m, variant);
                let l1c = Cpu.masked_l1(&j, &keep, 7).unwrap();
                let l1g = gpu.masked_l1(&j, &keep, 7).unwrap();
                for (a, b) in l1c.iter().zip(&l1g) {
                    for t in 0..2 {
                        assert!(
                            (a[t] - b[t]).abs() <= 1e-5 * a[t].abs() + 1e-6,
                            "[{cfg}] n={n} {dt} masked_l1 {a:?} vs {b:?}"
                        );
                    }
                }
                for (ci, consensus) in [Consensus::None, Consensus::Sum, Consensus::Count]
                    .into_iter()
                    .enumerate()
                {
                    let spec = GtaSpec {
                        weights: vec![0.7, -0.2, 0.5],
                        keep: keep.clone(),
                        scale: vec![1.0, 1.25, 0.8],
                        consensus,
                        normalize: ci != 1 || variant % 2 == 0,
                        lambda: if variant == 2 { 1.0 } else { 0.9 },
                        seed: 42,
                    };
                    let mut a = vec![0u8; j.out_bytes()];
                    let mut b = vec![0u8; j.out_bytes()];
                    Cpu.gta(&j, &spec, &mut a).unwrap();
                    gpu.gta(&j, &spec, &mut b).unwrap();
                    let tol = if out == DType::F32 {
                        Tol::ulps(4)
                    } else {
                        Tol::ulps(1)
                    };
                    assert_close(
                        &format!(
                            "[{cfg}] n={n} {dt}->{out} load {load} variant {variant} {consensus:?}"
                        ),
                        &decode(out, &b),
                        &decode(out, &a),
                        out,
                        tol,
                    );
                }
            }
            gpu.end_job(&j);
        }
    });
}

#[test]
fn dare_masks_are_bit_identical() {
    each_case(|cfg, gpu, n, dt| {
        let (base, models) = inputs(n as u64 * 31, n, 1, dt, false);
        for (p, name) in [
            (0.1f32, "a"),
            (0.5, "model.layers.0.self_attn.q_proj.weight"),
            (0.9, "z"),
        ] {
            let j = job(name, &base, &models, dt, DType::F32, DType::F32);
            let spec = GtaSpec {
                weights: vec![1.0],
                keep: vec![Keep::Random { p }],
                scale: vec![1.0],
                consensus: Consensus::None,
                normalize: false,
                lambda: 1.0,
                seed: 0xDEAD_BEEF_0000_0001,
            };
            let mut a = vec![0u8; j.out_bytes()];
            let mut b = vec![0u8; j.out_bytes()];
            Cpu.gta(&j, &spec, &mut a).unwrap();
            gpu.gta(&j, &spec, &mut b).unwrap();
            let bd = decode(dt, &base);
            let mask = |o: &[u8]| -> Vec<bool> {
                decode(DType::F32, o)
                    .iter()
                    .zip(&bd)
                    .map(|(x, b)| x != b)
                    .collect()
            };
            assert_eq!(
                mask(&a),
                mask(&b),
                "[{cfg}] n={n} {dt} p={p}: DARE masks differ"
            );
            assert_eq!(a, b, "[{cfg}] n={n} {dt} p={p}: kept values differ");
        }
    });
}

#[test]
fn weighted_sums_match() {
    each_case(|cfg, gpu, n, dt| {
        let (_, models) = inputs(n as u64 * 3, n, 4, dt, false);
        for divisor in [None, Some(1.7f32)] {
            let j = Job::new(
                "w",
                None,
                models
                    .iter()
                    .map(|b| Input {
                        bytes: b,
                        dtype: dt,
                    })
                    .collect(),
                DType::F32,
                DType::F32,
            );
            let w = [0.4, 0.3, -0.2, 1.2];
            let mut a = vec![0u8; j.out_bytes()];
            let mut b = vec![0u8; j.out_bytes()];
            Cpu.weighted_sum(&j, &w, divisor, &mut a).unwrap();
            gpu.weighted_sum(&j, &w, divisor, &mut b).unwrap();
            assert_close(
                &format!("[{cfg}] n={n} {dt} weighted_sum {divisor:?}"),
                &decode(DType::F32, &b),
                &decode(DType::F32, &a),
                DType::F32,
                Tol::ulps(4),
            );
        }
    });
}

#[test]
fn tiles_are_cut_as_configured() {
    for (cfg, gpu) in gpus() {
        let (base, models) = inputs(5, 3 * TILE + 5, 2, DType::BF16, false);
        let j = job("t", &base, &models, DType::BF16, DType::F32, DType::F32);
        let (tile, tiles, resident) = gpu.tiling(&j).unwrap();
        match cfg {
            "whole" => assert_eq!((tiles, resident), (1, true)),
            "tiled" => assert_eq!((tile, tiles, resident), (TILE, 4, true)),
            _ => assert_eq!((tile, tiles, resident), (TILE, 4, false)),
        }
    }
}

#[test]
fn pipeline_cache_builds_each_pipeline_once() {
    let Some(ctx) = common::fresh_gpu_context() else {
        return;
    };
    let gpu = Gpu::with_context(ctx, &GpuOptions::default());
    let (base, models) = inputs(9, 5000, 2, DType::F32, true);
    let run = || {
        let j = job("p", &base, &models, DType::F32, DType::F32, DType::F32);
        let qs = [
            Query {
                source: Source::Delta(0),
                k: 100,
            },
            Query {
                source: Source::Delta(1),
                k: 2500,
            },
        ];
        let cuts = gpu.select(&j, &qs).unwrap();
        let keep = vec![Keep::top(cuts[0]), Keep::Random { p: 0.5 }];
        gpu.masked_l1(&j, &keep, 1).unwrap();
        let mut out = vec![0u8; j.out_bytes()];
        let spec = GtaSpec {
            weights: vec![1.0, 1.0],
            keep,
            scale: vec![1.0, 1.0],
            consensus: Consensus::Sum,
            normalize: true,
            lambda: 1.0,
            seed: 1,
        };
        gpu.gta(&j, &spec, &mut out).unwrap();
        gpu.weighted_sum(&j, &[0.5, 0.5], None, &mut out).unwrap();
        gpu.end_job(&j);
    };
    run();
    let after_first = gpu.pipelines_built();
    // histogram, (count_equal, equal_bits if the data tie at a cut), masked_l1, gta, weighted_sum
    assert!((4..=6).contains(&after_first), "{after_first} pipelines");
    run();
    run();
    assert_eq!(
        gpu.pipelines_built(),
        after_first,
        "a pipeline was built twice"
    );
}

#[test]
fn ci_runs_on_vulkan() {
    if std::env::var_os("SMELT_REQUIRE_GPU").is_none() {
        return;
    }
    let ctx = common::gpu_context().expect("SMELT_REQUIRE_GPU is set but no GPU adapter works");
    assert_eq!(ctx.info.backend, "Vulkan", "adapter {:?}", ctx.info);
}
