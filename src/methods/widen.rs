//! `widen` — WIDEN, weight disentanglement (Yu et al. 2024, arXiv 2408.03092;
//! docs/ALGORITHMS.md §12), as MergeLLM's `widen_merging` computes it. Merges fine-tuned *and*
//! further-pre-trained models into a base.
//!
//! 2-D tensors, per column c (input unit; for an input embedding, per token: the reference
//! transposes it first): each model's magnitude change `dM = |‖x_c‖ − ‖w_c‖|` and direction
//! change `dD = 1 − cos(x_c, w_c)` against the base, ranked within the model (stable
//! ascending sort position / columns); `score(G)` = softmax over models of G, overwritten with
//! `s` where G exceeds `t`·(the model's mean over columns); the column's weight for model m is
//! `½(score(rank dM) + score(rank dD))` and `W = W0 + Σ_m weight[m, c]·δ_m[:, c]`. 1-D
//! tensors: G = |δ| per element, no ranks, weight = score(G). The weights do not sum to 1.

use super::dense::vectors;
use super::{BasePolicy, Ctx, Default, Kind, Method, MethodInfo, ParamSpec, Params, Scope};
use crate::backend::{Backend, Segments, Vector};
use crate::error::Result;

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "widen",
        pretty: "WIDEN (weight disentanglement)",
        reference: "https://arxiv.org/abs/2408.03092",
        summary: "Per column, weight each model by the rank of its magnitude and direction change against the base (softmax over models, calibrated above the mean); merges fine-tuned and pre-trained models.",
        params: vec![
            ParamSpec {
                name: "above_average_value_ratio",
                kind: Kind::Float,
                scope: Scope::Shared,
                default: Default::Float(1.0),
                help: "t: a score is calibrated where its value exceeds t × the model's mean",
            },
            ParamSpec {
                name: "score_calibration_value",
                kind: Kind::Float,
                scope: Scope::Shared,
                default: Default::Float(1.0),
                help: "s: the weight a calibrated (above-average) score is set to",
            },
        ],
        base: BasePolicy::Required,
        models: (1, None),
        imp: Box::new(Widen),
    }]
}

/// Input embeddings are merged per token: MergeLLM transposes `model.embed_tokens.weight`
/// (vocab × hidden) so that its columns are tokens. Output heads (`lm_head`) are ordinary
/// linear layers, merged per input unit.
fn per_row(name: &str) -> bool {
    super::dense::is_input_embedding(name)
}

/// Elements a GPU tile keeps together: whole 256-row bands of columns for 2-D tensors (a
/// multiple of the row length too, for the per-token embeddings).
pub fn align(shape: &[usize]) -> usize {
    match *shape {
        [_, cols] => Segments::Cols { cols }.align(),
        _ => 1,
    }
}

/// Rank of each value in a stable ascending sort, divided by the count.
fn ranks(g: &[f64]) -> Vec<f64> {
    let n = g.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| g[a].total_cmp(&g[b])); // stable
    let mut r = vec![0.0; n];
    for (pos, &i) in idx.iter().enumerate() {
        r[i] = pos as f64 / n as f64;
    }
    r
}

/// `score(G)` for G given as one row of `n` values per model: softmax over models per
/// column, then `s` where G[m, c] > t · mean_c G[m, :].
fn score(g: &[Vec<f64>], t: f64, s: f64) -> Vec<Vec<f64>> {
    let m = g.len();
    let n = g[0].len();
    let thr: Vec<f64> = g
        .iter()
        .map(|r| t * r.iter().sum::<f64>() / n as f64)
        .collect();
    let mut p = vec![vec![0.0; n]; m];
    for c in 0..n {
        let mx = (0..m).map(|i| g[i][c]).fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = (0..m).map(|i| (g[i][c] - mx).exp()).collect();
        let z: f64 = e.iter().sum();
        for i in 0..m {
            p[i][c] = if g[i][c] > thr[i] { s } else { e[i] / z };
        }
    }
    p
}

pub fn run(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let job = cx.job;
    let m = job.models.len();
    let t = cx.params.shared_f("above_average_value_ratio");
    let s = cx.params.shared_f("score_calibration_value");
    let (seg, weights) = match *cx.shape {
        [rows, cols] => {
            let seg = if per_row(job.name) {
                Segments::Rows { len: cols }
            } else {
                Segments::Cols { cols }
            };
            let n = if per_row(job.name) { rows } else { cols };
            // vectors: base, models; pairs: (b, b), then per model (x, x), (x, b)
            let mut vecs = vec![Vector::Base];
            vecs.extend((0..m).map(Vector::Model));
            let mut pairs = vec![(0, 0)];
            for i in 0..m {
                pairs.push((1 + i, 1 + i));
                pairs.push((1 + i, 0));
            }
            let np = pairs.len();
            let d = b.dots(job, &vecs, &pairs, seg)?;
            let mut dm = vec![vec![0.0; n]; m];
            let mut dd = vec![vec![0.0; n]; m];
            for c in 0..n {
                let r = &d[c * np..(c + 1) * np];
                let nb = r[0].max(0.0).sqrt();
                for i in 0..m {
                    let nx = r[1 + 2 * i].max(0.0).sqrt();
                    dm[i][c] = (nx - nb).abs();
                    // a zero column has no direction (the reference divides by 0 there):
                    // count it as orthogonal
                    let cos = if nx > 0.0 && nb > 0.0 {
                        r[2 + 2 * i] / (nx * nb)
                    } else {
                        0.0
                    };
                    dd[i][c] = 1.0 - cos;
                }
            }
            let rm: Vec<Vec<f64>> = dm.iter().map(|g| ranks(g)).collect();
            let rd: Vec<Vec<f64>> = dd.iter().map(|g| ranks(g)).collect();
            let (pm, pd) = (score(&rm, t, s), score(&rd, t, s));
            let w: Vec<Vec<f64>> = (0..m)
                .map(|i| (0..n).map(|c| 0.5 * (pm[i][c] + pd[i][c])).collect())
                .collect();
            (seg, w)
        }
        [_] | [] => {
            // per element: G = |δ| as the f32 deltas are
            let vecs: Vec<Vector> = (0..m).map(Vector::Delta).collect();
            let deltas = vectors(b, job, &vecs, &vec![1.0; m])?;
            let g: Vec<Vec<f64>> = deltas
                .iter()
                .map(|d| d.iter().map(|x| x.abs() as f64).collect())
                .collect();
            (Segments::Rows { len: 1 }, score(&g, t, s))
        }
        _ => {
            return Err(cx.err(format!(
                "WIDEN merges 2-D (linear, embedding) and 1-D tensors; this one is {:?}",
                cx.shape
            )))
        }
    };
    // out = base + Σ_m w[m, c]·δ_m, coefficients per column (or per element)
    let nseg = weights[0].len();
    let mut terms = vec![Vector::Base];
    terms.extend((0..m).map(Vector::Delta));
    let mut coefs = Vec::with_capacity(nseg * (m + 1));
    for c in 0..nseg {
        coefs.push(1.0f32);
        coefs.extend(weights.iter().map(|w| w[c] as f32));
    }
    b.combine(job, &terms, seg, &coefs, out)
}

#[derive(Debug)]
struct Widen;

impl Method for Widen {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        run(b, cx, out)
    }
    fn align(&self, _params: &Params, shape: &[usize]) -> usize {
        align(shape)
    }
}
