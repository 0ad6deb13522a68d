//! `pcb` — PCB-merging, Parameter Competition Balancing (Du et al., NeurIPS 2024;
//! docs/ALGORITHMS.md §11), as the authors' `pcb-merging.py::PCB_merge` computes it.
//!
//! The reference flattens the whole model into one row per task vector and takes order
//! statistics of each row; so does this: before any tensor is merged, passes over every
//! merged tensor find, per model i, the magnitudes |τ_i| at ascending positions
//! int(d·1e-4) and int(d·(1 − 1e-4) − 1) (the clamp of A), then the balancing scores β_i at
//! position int(d·(1 − r)) and their maximum (the drop of the lowest 1 − r and the rescale
//! to [0, 1]), all exact order statistics by two-level radix histograms. The merge of each
//! tensor is then elementwise ([`crate::backend::PcbSpec`]): intra-balancing
//! exp(n·minmax(A)²) times inter-balancing tanh(τ_i·Σ τ), and the clamped task vectors
//! averaged with those scores. Per-model `weight` is the λ_t of the authors' vision scripts
//! (`PCB_merge` itself has none: weight 1).

use super::{BasePolicy, Ctx, Default, EachJob, Kind, Method, MethodInfo, ParamSpec, Params, Scope};
use crate::backend::{bucket_of, Backend, PcbSpec, Source};
use crate::dtype::{self, DType};
use crate::error::{Error, Result};

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "pcb",
        pretty: "PCB-merging (Parameter Competition Balancing)",
        reference: "https://arxiv.org/abs/2410.02396",
        summary: "Score every element of every task vector by its own magnitude (intra-balancing) and its agreement with the others (inter-balancing), over the whole model; drop all but the top pcb_ratio scores, average the rest by score.",
        params: vec![
            ParamSpec {
                name: "weight",
                kind: Kind::Float,
                scope: Scope::NonBase,
                default: Default::Float(1.0),
                help: "λ: scale of this model's clamped task vector in the weighted average",
            },
            ParamSpec {
                name: "pcb_ratio",
                kind: Kind::Float,
                scope: Scope::Shared,
                default: Default::Float(0.1),
                help: "fraction of each task vector's balancing scores kept, over the whole model (one value for all tensors)",
            },
        ],
        base: BasePolicy::Required,
        models: (1, None),
        imp: Box::new(Pcb),
    }]
}

pub fn check(params: &Params) -> std::result::Result<(), String> {
    let r = params.shared_f("pcb_ratio");
    if !(r > 0.0 && r <= 1.0) {
        return Err(format!("pcb_ratio {r} is not a fraction in (0, 1]"));
    }
    Ok(())
}

/// Python's `int(x)` of a float64 product, as an index into 0..d (clamped).
fn py_index(x: f64, d: u64) -> u64 {
    if x <= 0.0 {
        0
    } else {
        (x as u64).min(d.saturating_sub(1))
    }
}

/// Order-preserving u32 key of a signed f32 (larger value, larger key).
fn ordered(bits: u32) -> u32 {
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

fn unordered(key: u32) -> f32 {
    f32::from_bits(if key >> 31 == 1 {
        key & 0x7fff_ffff
    } else {
        !key
    })
}

/// Per model: lo, hi, q, bmax (see the module docs), as `[lo.., hi.., q.., bmax..]`.
pub fn globals(b: &dyn Backend, each: &EachJob) -> Result<Vec<f64>> {
    let mut m = 0usize;
    let mut d = 0u64;
    let mut ratio: Option<(f64, String)> = None;
    // |τ_i| clamp bounds: level 1 over the high 16 bits of the f32 keys
    let mut h1: Vec<Vec<u64>> = Vec::new();
    each(&mut |job, params, _| {
        let r = params.shared_f("pcb_ratio");
        match &ratio {
            None => ratio = Some((r, job.name.to_string())),
            Some((r0, first)) if *r0 != r => {
                return Err(Error::Param {
                    tensor: job.name.to_string(),
                    msg: format!(
                        "pcb_ratio is {r} here but {r0} for {first}; PCB ranks the whole model, so it takes one value"
                    ),
                })
            }
            _ => {}
        }
        m = job.models.len();
        d += job.numel as u64;
        let srcs: Vec<(Source, Option<u32>)> = (0..m).map(|i| (Source::Delta(i), None)).collect();
        let h = b.histogram(job, &srcs)?;
        h1.resize(m, vec![0; 1 << 16]);
        for (acc, x) in h1.iter_mut().zip(&h) {
            acc.iter_mut().zip(x).for_each(|(a, c)| *a += c);
        }
        Ok(())
    })?;
    let Some((r, _)) = ratio else {
        return Ok(Vec::new());
    };
    let df = d as f64;
    let j_lo = py_index(df * 1e-4, d);
    let j_hi = py_index(df * (1.0 - 1e-4) - 1.0, d);
    let j_q = py_index(df * (1.0 - r), d);
    let first: Vec<[(u32, u64); 2]> = h1
        .iter()
        .map(|h| [bucket_of(h, j_lo), bucket_of(h, j_hi)])
        .collect();
    let mut h2 = vec![vec![0u64; 1 << 16]; 2 * m];
    each(&mut |job, _, _| {
        let srcs: Vec<(Source, Option<u32>)> = (0..2 * m)
            .map(|k| (Source::Delta(k / 2), Some(first[k / 2][k % 2].0)))
            .collect();
        let h = b.histogram(job, &srcs)?;
        for (acc, x) in h2.iter_mut().zip(&h) {
            acc.iter_mut().zip(x).for_each(|(a, c)| *a += c);
        }
        Ok(())
    })?;
    let bound = |k: usize| {
        let (hb, within) = first[k / 2][k % 2];
        let (lb, _) = bucket_of(&h2[k], within);
        f32::from_bits((hb << 16) | lb)
    };
    let lo: Vec<f32> = (0..m).map(|i| bound(2 * i)).collect();
    let hi: Vec<f32> = (0..m).map(|i| bound(2 * i + 1)).collect();
    if let Some(i) = (0..m).find(|&i| lo[i] >= hi[i]) {
        return Err(Error::Param {
            tensor: "(whole model)".into(),
            msg: format!(
                "the task vector of model {i} has {} elements between its clamp bounds ({} ≥ {}); PCB's min-max scaling would divide by 0",
                "no spread of magnitudes", lo[i], hi[i]
            ),
        });
    }
    let mut spec = PcbSpec {
        lo,
        hi,
        q: vec![0.0; m],
        bmax: vec![0.0; m],
        weights: vec![1.0; m],
    };
    // β_i: level 1 and the maximum, then level 2 at position j_q
    let mut h3 = vec![vec![0u64; 1 << 16]; m];
    let mut kmax = vec![0u32; m];
    let betas = |job: &crate::backend::Job, spec: &PcbSpec, i: usize| -> Result<Vec<u32>> {
        let mut out = vec![0u8; job.numel * 4];
        b.pcb(job, spec, Some(i), &mut out)?;
        let mut v = vec![0f32; job.numel];
        dtype::decode(DType::F32, &out, &mut v);
        Ok(v.iter().map(|x| ordered(x.to_bits())).collect())
    };
    each(&mut |job, _, _| {
        for i in 0..m {
            for k in betas(job, &spec, i)? {
                h3[i][(k >> 16) as usize] += 1;
                kmax[i] = kmax[i].max(k);
            }
        }
        Ok(())
    })?;
    let qb: Vec<(u32, u64)> = h3.iter().map(|h| bucket_of(h, j_q)).collect();
    let mut h4 = vec![vec![0u64; 1 << 16]; m];
    each(&mut |job, _, _| {
        for i in 0..m {
            for k in betas(job, &spec, i)? {
                if k >> 16 == qb[i].0 {
                    h4[i][(k & 0xffff) as usize] += 1;
                }
            }
        }
        Ok(())
    })?;
    for i in 0..m {
        let (lb, _) = bucket_of(&h4[i], qb[i].1);
        spec.q[i] = unordered((qb[i].0 << 16) | lb);
        spec.bmax[i] = unordered(kmax[i]);
        if spec.q[i] >= spec.bmax[i] {
            return Err(Error::Param {
                tensor: "(whole model)".into(),
                msg: format!(
                    "the balancing scores of model {i} are constant above the pcb_ratio cut ({} = max); PCB's min-max scaling would divide by 0 (raise pcb_ratio)",
                    spec.q[i]
                ),
            });
        }
    }
    let mut g: Vec<f64> = Vec::with_capacity(4 * m);
    for v in [&spec.lo, &spec.hi, &spec.q, &spec.bmax] {
        g.extend(v.iter().map(|x| *x as f64));
    }
    Ok(g)
}

pub fn run(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let m = cx.job.models.len();
    if cx.globals.len() != 4 * m {
        return Err(
            cx.err("PCB's whole-model statistics were not computed (merge through a plan)".into())
        );
    }
    let g = |k: usize| -> Vec<f32> {
        cx.globals[k * m..(k + 1) * m]
            .iter()
            .map(|x| *x as f32)
            .collect()
    };
    let spec = PcbSpec {
        lo: g(0),
        hi: g(1),
        q: g(2),
        bmax: g(3),
        weights: (0..m)
            .map(|i| cx.model_f(i, "weight").unwrap_or(1.0) as f32)
            .collect(),
    };
    b.pcb(cx.job, &spec, None, out)
}

#[derive(Debug)]
struct Pcb;

impl Method for Pcb {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        run(b, cx, out)
    }
    fn check(&self, params: &Params) -> std::result::Result<(), String> {
        check(params)
    }
    fn wants_globals(&self, _params: &Params) -> bool {
        true
    }
    fn whole_model(
        &self,
        b: &dyn Backend,
        each: &EachJob,
        _seed: u64,
        _prior: Option<&serde_json::Value>,
    ) -> Result<Vec<f64>> {
        globals(b, each)
    }
}
