//! The GPU kernels against the CPU path, primitive by primitive, on random tensors of awkward
//! sizes in all three dtypes, with whole-tensor tiles, with small tiles that force a tensor
//! across several tiles, and with a budget that forces streaming. Selections and random
//! masks must be identical; arithmetic within a few ulp.
//!
//! Needs a GPU adapter (lavapipe in CI). Without one the tests say so and pass, unless
//! SMELT_REQUIRE_GPU is set (as `.ci/run` does), in which case they fail.

use crate::common;

use crate::common::{assert_close, Tol};
use smelt::backend::cpu::Cpu;
use smelt::backend::gpu::{Gpu, GpuOptions};
use smelt::backend::{
    Backend, Consensus, Fused, GtaSpec, Input, Job, Keep, Key, Query, RankCut, RowLayout, Segments,
    Source, Sparsity, Vector, Vote,
};
use smelt::dtype::{self, DType};

const TILE: usize = 4096;
const SIZES: [usize; 7] = [1, 7, 255, 1024, TILE + 1, 3 * TILE + 5, 65537];
// 3 * TILE + 5 = 12293 = 19 rows of 647
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
            for src in [
                Source::Delta(0),
                Source::Delta(2),
                Source::Model(1),
                Source::Variance,
            ] {
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
                let xs: Vec<Vec<f32>> = models.iter().map(|m| decode(dt, m)).collect();
                let key = |e: usize| -> f32 {
                    match q.source {
                        Source::Delta(i) => xs[i][e] - bd[e],
                        Source::Model(i) => xs[i][e],
                        Source::Variance => {
                            let d: Vec<f32> = xs.iter().map(|x| x[e] - bd[e]).collect();
                            let mut mean = 0.0f32;
                            d.iter().for_each(|v| mean += v);
                            mean *= 1.0 / d.len() as f32;
                            let mut v = 0.0f32;
                            d.iter().for_each(|x| v += (x - mean) * (x - mean));
                            v
                        }
                    }
                };
                let kept = (0..n)
                    .filter(|&e| cut.below(key(e).abs().to_bits(), e as u32))
                    .count() as u64;
                assert_eq!(kept, q.k.min(n64), "[{cfg}] n={n} {dt} {q:?}");
            }
        }
    });
}

/// A different mix of keep rules per variant: every rule appears for every model position.
/// `cuts` holds per model a top-k cut and a smaller one, then one cut of the variance key.
fn sparsity(cuts: &[RankCut], m: usize, variant: usize, rows: RowLayout) -> Sparsity {
    let keep = (0..m)
        .map(|i| match (variant + i) % 7 {
            0 => Keep::All,
            1 => Keep::top(cuts[i]),
            2 => Keep::Random { p: 0.3 },
            3 => Keep::Ranks {
                lo: cuts[m + i],
                hi: cuts[i],
                key: Key::Delta,
            },
            4 => Keep::Ranks {
                lo: RankCut::NONE,
                hi: cuts[2 * m],
                key: Key::Variance,
            },
            5 => Keep::Della { rows, table: i % 2 },
            _ => Keep::Nothing,
        })
        .collect();
    Sparsity {
        keep,
        tables: vec![
            smelt::methods::della_table(0.5, 0.1, rows.len),
            smelt::methods::della_table(0.3, 0.25, rows.len),
        ],
        seed: 7,
    }
}

/// A 2-D shape for `n` elements with rows of a few hundred (or one row).
fn shape_of(n: usize) -> Vec<usize> {
    match n {
        255 => vec![3, 85],
        1024 => vec![32, 32],
        4097 => vec![17, 241],
        12293 => vec![19, 647],
        65537 => vec![65537],
        _ => vec![n],
    }
}

#[test]
fn gta_and_norms_match() {
    each_case(|cfg, gpu, n, dt| {
        let m = 3;
        let shape = shape_of(n);
        let rows = RowLayout::along_dim1(&shape);
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
            )
            .with_align(rows.slab());
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
            qs.push(Query {
                source: Source::Variance,
                k: n64 / 3,
            });
            let cuts = Cpu.select(&j, &qs).unwrap();
            assert_eq!(
                cuts,
                gpu.select(&j, &qs).unwrap(),
                "[{cfg}] n={n} {dt} cuts"
            );
            for variant in 0..7 {
                let sp = sparsity(&cuts, m, variant, rows);
                let sc = Cpu.masked_sums(&j, &sp, true).unwrap();
                let sg = gpu.masked_sums(&j, &sp, true).unwrap();
                for (a, b) in sc.iter().zip(&sg) {
                    for t in 0..3 {
                        assert!(
                            (a[t] - b[t]).abs() <= 1e-5 * a[t].abs() + 1e-6,
                            "[{cfg}] n={n} {dt} variant {variant} masked_sums {a:?} vs {b:?}"
                        );
                    }
                }
                // every consensus, vote and divisor rule meets every keep rule across variants
                {
                    let ci = variant % 3;
                    let consensus = [Consensus::None, Consensus::Sum, Consensus::Count][ci];
                    let spec = GtaSpec {
                        weights: vec![0.7, -0.2, 0.5],
                        sparsity: sp.clone(),
                        scale: vec![1.0, 1.25, 0.8],
                        consensus,
                        vote: if variant % 2 == 0 {
                            Vote::Weighted
                        } else {
                            Vote::Unweighted
                        },
                        normalize: ci != 1 || variant % 2 == 0,
                        div_floor: if variant % 3 == 0 { Some(1e-6) } else { None },
                        lambda: if variant == 2 { 1.0 } else { 0.9 },
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
fn della_masks_are_bit_identical() {
    each_case(|cfg, gpu, n, dt| {
        let shape = shape_of(n);
        let rows = RowLayout::along_dim1(&shape);
        let (base, models) = inputs(n as u64 * 17, n, 1, dt, true);
        let j = job("della", &base, &models, dt, DType::F32, DType::F32).with_align(rows.slab());
        let spec = GtaSpec {
            weights: vec![1.0],
            sparsity: Sparsity {
                keep: vec![Keep::Della { rows, table: 0 }],
                tables: vec![smelt::methods::della_table(0.5, 0.3, rows.len)],
                seed: 99,
            },
            scale: vec![1.0],
            consensus: Consensus::None,
            vote: Vote::Weighted,
            normalize: false,
            div_floor: None,
            lambda: 1.0,
        };
        let mut a = vec![0u8; j.out_bytes()];
        let mut b = vec![0u8; j.out_bytes()];
        Cpu.gta(&j, &spec, &mut a).unwrap();
        gpu.gta(&j, &spec, &mut b).unwrap();
        assert_eq!(a, b, "[{cfg}] n={n} {dt} {shape:?}: DELLA keeps differ");
    });
}

#[test]
fn dots_and_combines_match() {
    each_case(|cfg, gpu, n, dt| {
        let shape = shape_of(n);
        let (base, models) = inputs(n as u64 * 23, n, 3, dt, false);
        let vecs = [
            Vector::Model(0),
            Vector::Delta(1),
            Vector::Base,
            Vector::Delta(2),
        ];
        let pairs = [(0, 0), (0, 1), (1, 1), (1, 3), (2, 3), (3, 3)];
        let mut segs = vec![
            Segments::Whole,
            Segments::Rows {
                len: *shape.last().unwrap(),
            },
        ];
        segs.push(Segments::Cols { cols: n / shape[0] });
        for seg in segs {
            let j = job("dots", &base, &models, dt, DType::F32, DType::F32).with_align(seg.align());
            let a = Cpu.dots(&j, &vecs, &pairs, seg).unwrap();
            let b = gpu.dots(&j, &vecs, &pairs, seg).unwrap();
            assert_eq!(a.len(), seg.count(n) * pairs.len());
            // f32 partial sums on the GPU: judged against the scale of the norms involved
            let scale: f64 = a.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-30);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "[{cfg}] n={n} {dt} {seg:?} dot {i}: {x} vs {y}"
                );
            }
            let nseg = seg.count(n);
            let coefs: Vec<f32> = (0..nseg * vecs.len())
                .map(|i| ((i * 7919) % 13) as f32 / 6.5 - 1.0)
                .collect();
            let mut oa = vec![0u8; j.out_bytes()];
            let mut ob = vec![0u8; j.out_bytes()];
            Cpu.combine(&j, &vecs, seg, &coefs, &mut oa).unwrap();
            gpu.combine(&j, &vecs, seg, &coefs, &mut ob).unwrap();
            assert_close(
                &format!("[{cfg}] n={n} {dt} combine {seg:?}"),
                &decode(DType::F32, &ob),
                &decode(DType::F32, &oa),
                DType::F32,
                Tol {
                    abs: 1e-6,
                    rel: 0.0,
                    ulps: 4,
                },
            );
        }
        for t in [1e-3f32, 0.05, 10.0] {
            let j = job("ns", &base, &models[..1], dt, DType::F32, dt);
            let mut oa = vec![0u8; j.out_bytes()];
            let mut ob = vec![0u8; j.out_bytes()];
            Cpu.nearswap(&j, t, &mut oa).unwrap();
            gpu.nearswap(&j, t, &mut ob).unwrap();
            assert_close(
                &format!("[{cfg}] n={n} {dt} nearswap t={t}"),
                &decode(dt, &ob),
                &decode(dt, &oa),
                dt,
                Tol::ulps(4),
            );
        }
        // ComPEFT's ternary codes: exactly equal, at thresholds that cut through the data
        let j = job("tern", &base, &models[..1], dt, DType::F32, DType::BF16);
        for thr in [0.0f32, 1e-3, 0.3, 0.9, f32::INFINITY] {
            let mut oa = vec![0u8; j.out_bytes()];
            let mut ob = vec![0u8; j.out_bytes()];
            Cpu.ternary(&j, thr.to_bits(), &mut oa).unwrap();
            gpu.ternary(&j, thr.to_bits(), &mut ob).unwrap();
            // equal as numbers (a zero's sign is not part of the code: the packing reads
            // only magnitude and the sign of non-zeros)
            let (ca, cb) = (decode(DType::BF16, &oa), decode(DType::BF16, &ob));
            if let Some(i) = (0..n).find(|&i| ca[i] != cb[i]) {
                panic!(
                    "[{cfg}] n={n} {dt} ternary at {thr}: element {i}: cpu {} gpu {}",
                    ca[i], cb[i]
                );
            }
            let codes = decode(DType::BF16, &oa);
            assert!(codes.iter().all(|c| [-1.0, 0.0, 1.0].contains(c)));
            if thr == f32::INFINITY {
                assert!(codes.iter().all(|c| *c == 0.0));
            }
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
                sparsity: Sparsity::new(vec![Keep::Random { p }], 0xDEAD_BEEF_0000_0001),
                scale: vec![1.0],
                consensus: Consensus::None,
                vote: Vote::Weighted,
                normalize: false,
                div_floor: None,
                lambda: 1.0,
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
        let sp = Sparsity::new(vec![Keep::top(cuts[0]), Keep::Random { p: 0.5 }], 1);
        gpu.masked_sums(&j, &sp, true).unwrap();
        let mut out = vec![0u8; j.out_bytes()];
        let spec = GtaSpec {
            weights: vec![1.0, 1.0],
            sparsity: sp,
            scale: vec![1.0, 1.0],
            consensus: Consensus::Sum,
            vote: Vote::Weighted,
            normalize: true,
            div_floor: None,
            lambda: 1.0,
        };
        gpu.gta(&j, &spec, &mut out).unwrap();
        gpu.weighted_sum(&j, &[0.5, 0.5], None, &mut out).unwrap();
        gpu.end_job(&j);
    };
    run();
    let after_first = gpu.pipelines_built();
    // histogram, (count_equal, equal_bits if the data tie at a cut), masked_sums, gta, weighted_sum
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

/// Whole-tensor dot products keep differences far below f32's resolution of their terms:
/// |x1|² = 1 + 1e-6 and x0·x1 = -1 must come out so that |x0 + x1|² = 2 - 2 + 1e-6 keeps its
/// digits, as the SLERP family needs near antipodal inputs. Every backend must give the
/// Gram matrix to about f64 accuracy (computed here by hand: 1e-3 is 0x3a83126f in f32).
#[test]
fn whole_dot_products_are_compensated() {
    let y = 1e-3f32;
    let x0 = [1.0f32, 0.0];
    let x1 = [-1.0f32, y];
    let enc = |v: &[f32]| common::encode(DType::F32, v);
    let models = vec![enc(&x0), enc(&x1)];
    let base = enc(&[0.0, 0.0]);
    let j = job("cancel", &base, &models, DType::F32, DType::F32, DType::F32);
    let vecs = [Vector::Model(0), Vector::Model(1)];
    let pairs = [(0, 0), (0, 1), (1, 1)];
    let yy = y as f64 * y as f64;
    let want = [1.0, -1.0, 1.0 + yy];
    let mut backends: Vec<(&str, Box<dyn Backend>)> = vec![("cpu", Box::new(Cpu))];
    if let Some(ctx) = common::gpu_context() {
        backends.push((
            "gpu",
            Box::new(Gpu::with_context(ctx, &GpuOptions::default())),
        ));
    }
    for (name, be) in backends {
        let g = be.dots(&j, &vecs, &pairs, Segments::Whole).unwrap();
        for (k, (got, w)) in g.iter().zip(&want).enumerate() {
            assert!(
                (got - w).abs() <= 1e-12,
                "{name}: pair {k}: {got:e} vs {w:e}"
            );
        }
    }
}
