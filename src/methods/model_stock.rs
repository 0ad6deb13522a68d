//! `model_stock` (Jang et al. 2024): interpolate between the base and the average of the
//! fine-tunes by a ratio from the angle between their task vectors:
//! t = N·cos / (1 + (N - 1)·cos), out = t·mean(θᵢ) + (1 - t)·base; per row with
//! `filter_wise`.

use super::{BasePolicy, Ctx, Default, Kind, Method, MethodInfo, ParamSpec, Params, Scope};
use crate::backend::{Backend, Segments, Vector};
use crate::error::Result;

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "model_stock",
        pretty: "Model Stock",
        reference: "https://arxiv.org/abs/2403.19522",
        summary: "Move from the base toward the fine-tunes' average by how much their task vectors agree in direction.",
        params: vec![ParamSpec {
            name: "filter_wise",
            kind: Kind::Bool,
            scope: Scope::Shared,
            default: Default::Bool(false),
            help: "one ratio per row (last dimension) instead of per tensor",
        }],
        base: BasePolicy::Required,
        models: (2, None),
        imp: Box::new(ModelStock),
    }]
}

/// Whole tensors, or with `filter_wise` the rows of the last dimension (1-D: one row).
pub fn segments(params: &Params, shape: &[usize]) -> Segments {
    match (params.shared_b("filter_wise"), shape.last()) {
        (true, Some(&len)) if shape.len() > 1 => Segments::Rows { len },
        _ => Segments::Whole,
    }
}

pub fn run(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let job = cx.job;
    let n = job.models.len();
    let seg = segments(cx.params, cx.shape);
    let vecs: Vec<Vector> = (0..n).map(Vector::Delta).collect();
    let mut pairs = Vec::new();
    for i in 0..n {
        pairs.push((i, i));
    }
    for i in 0..n {
        for j in i + 1..n {
            pairs.push((i, j));
        }
    }
    let dots = b.dots(job, &vecs, &pairs, seg)?;
    let np = pairs.len();
    let nseg = seg.count(job.numel);
    let mut terms: Vec<Vector> = (0..n).map(Vector::Model).collect();
    terms.push(Vector::Base);
    let mut coefs = Vec::with_capacity(nseg * (n + 1));
    for s in 0..nseg {
        let d = &dots[s * np..(s + 1) * np];
        let norm: Vec<f64> = (0..n).map(|i| d[i].max(0.0).sqrt()).collect();
        let mut sum = 0.0;
        let mut count = 0;
        for (p, &(i, j)) in pairs.iter().enumerate().skip(n) {
            sum += (d[p] / (norm[i] * norm[j]).max(1e-6)).clamp(-1.0, 1.0);
            count += 1;
        }
        let cos = sum / count as f64;
        let den = 1.0 + (n as f64 - 1.0) * cos;
        // at the singularity there is no finite estimate: keep the base
        let t = if den.abs() < 1e-6 {
            0.0
        } else {
            n as f64 * cos / den
        };
        coefs.extend(std::iter::repeat_n((t / n as f64) as f32, n));
        coefs.push((1.0 - t) as f32);
    }
    b.combine(job, &terms, seg, &coefs, out)
}

#[derive(Debug)]
struct ModelStock;

impl Method for ModelStock {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        run(b, cx, out)
    }
    fn align(&self, params: &Params, shape: &[usize]) -> usize {
        segments(params, shape).align()
    }
}
