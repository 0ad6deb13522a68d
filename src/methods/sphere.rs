//! The spherical family: `slerp`, `nuslerp`, `multislerp`, `karcher` (mergekit 0.1.5).
//!
//! Each result is a linear combination of the inputs whose coefficients depend only on their
//! norms and mutual dot products. So every method is one pass of dot products over the data
//! (the backend's `dots`), a little f64 arithmetic on the host — the Karcher iterations run
//! entirely in these coefficients — and one pass that forms the combination (`combine`).

use super::params::p;
use super::{BasePolicy, Ctx, Default, Kind, Method, MethodInfo, Params, Scope};
use crate::backend::{Backend, Segments, Vector};
use crate::error::Result;

pub fn methods() -> Vec<MethodInfo> {
    vec![
        MethodInfo {
            name: "slerp",
            pretty: "SLERP",
            reference: "https://en.wikipedia.org/wiki/Slerp",
            summary: "Spherical interpolation from the base (t = 0) to the other model (t = 1), per tensor.",
            params: vec![p(
                "t",
                Kind::Float,
                Scope::Shared,
                Default::Required,
                "interpolation factor: 0 is the base, 1 the other model (gradients and filters welcome)",
            )],
            base: BasePolicy::Required,
            models: (1, Some(1)),
            imp: Box::new(Sphere::Slerp),
        },
        MethodInfo {
            name: "nuslerp",
            pretty: "NuSLERP",
            reference: "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
            summary: "SLERP of two models by their weights, of their task vectors when a base is given, per tensor, row or column.",
            params: vec![
                p("weight", Kind::Float, Scope::NonBase, Default::Required, "weight of this model (t = w₂ / (w₁ + w₂))"),
                p(
                    "nuslerp_row_wise",
                    Kind::Bool,
                    Scope::Shared,
                    Default::Bool(false),
                    "without flattening: interpolate columns (dimension 0) instead of rows",
                ),
                p(
                    "nuslerp_flatten",
                    Kind::Bool,
                    Scope::Shared,
                    Default::Bool(true),
                    "treat each tensor as one vector",
                ),
            ],
            base: BasePolicy::Optional,
            models: (2, Some(2)),
            imp: Box::new(Sphere::NuSlerp),
        },
        MethodInfo {
            name: "multislerp",
            pretty: "Multi-SLERP",
            reference: "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            summary: "Weighted interpolation of any number of models on the hypersphere (of task vectors with a base).",
            params: vec![
                p("weight", Kind::Float, Scope::NonBase, Default::Required, "weight of this model"),
                p(
                    "normalize_weights",
                    Kind::Bool,
                    Scope::Shared,
                    Default::Bool(true),
                    "scale the weights to sum to one",
                ),
                p("eps", Kind::Float, Scope::Shared, Default::Float(1e-8), "guard against division by zero"),
            ],
            base: BasePolicy::Optional,
            models: (1, None),
            imp: Box::new(Sphere::MultiSlerp),
        },
        MethodInfo {
            name: "karcher",
            pretty: "Karcher mean",
            reference: "https://arxiv.org/abs/2603.04972",
            summary: "The Riemannian (Karcher) mean of the models' directions, scaled by their mean norm.",
            params: vec![
                p("max_iter", Kind::Float, Scope::Shared, Default::Float(10.0), "iterations at most"),
                p("tol", Kind::Float, Scope::Shared, Default::Float(1e-5), "convergence tolerance"),
            ],
            base: BasePolicy::Ignored,
            models: (1, None),
            imp: Box::new(Sphere::Karcher),
        },
    ]
}

pub fn check_karcher(params: &Params) -> std::result::Result<(), String> {
    let it = params.shared_f("max_iter");
    if it < 0.0 || it.fract() != 0.0 {
        return Err(format!(
            "max_iter must be a whole number of iterations, got {it}"
        ));
    }
    Ok(())
}

/// Dot products of every pair i <= j of `vecs`, per segment, as symmetric matrices.
fn gram(b: &dyn Backend, cx: &Ctx, vecs: &[Vector], seg: Segments) -> Result<Vec<Vec<f64>>> {
    let k = vecs.len();
    let mut pairs = Vec::new();
    for i in 0..k {
        for j in i..k {
            pairs.push((i, j));
        }
    }
    let d = b.dots(cx.job, vecs, &pairs, seg)?;
    let np = pairs.len();
    Ok((0..seg.count(cx.job.numel))
        .map(|s| {
            let mut g = vec![0.0; k * k];
            for (p, &(i, j)) in pairs.iter().enumerate() {
                g[i * k + j] = d[s * np + p];
                g[j * k + i] = d[s * np + p];
            }
            g
        })
        .collect())
}

/// Coefficients (a, b) of a slerp from v0 to v1 given the cosine of their angle.
fn slerp_coefs(t: f64, cos: f64, linear: bool) -> (f64, f64) {
    if linear {
        return (1.0 - t, t);
    }
    let theta = cos.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

pub fn slerp(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    // mergekit: t in f32; norms at most eps are taken as 1; |cos| > 0.9995 interpolates linearly
    let t = cx.params.shared_f("t") as f32 as f64;
    let vecs = [Vector::Base, Vector::Model(0)];
    let g = &gram(b, cx, &vecs, Segments::Whole)?[0];
    let norm = |x: f64| {
        let n = x.max(0.0).sqrt();
        if n > 1e-8 {
            n
        } else {
            1.0
        }
    };
    let cos = (g[1] / (norm(g[0]) * norm(g[3]))).clamp(-1.0, 1.0);
    let (ca, cb) = slerp_coefs(t, cos, cos.abs() > 0.9995);
    b.combine(cx.job, &vecs, Segments::Whole, &[ca as f32, cb as f32], out)
}

/// The vectors NuSLERP interpolates: the whole tensor, its rows (last dimension), or with
/// `nuslerp_row_wise` its columns (dimension 0).
pub fn nuslerp_segments(params: &Params, shape: &[usize]) -> Segments {
    let n: usize = shape.iter().product();
    if params.shared_b("nuslerp_flatten") {
        Segments::Whole
    } else if params.shared_b("nuslerp_row_wise") {
        // vectors along dimension 0: one per index of the other dimensions
        Segments::Cols {
            cols: n / shape.first().copied().unwrap_or(1).max(1),
        }
    } else {
        Segments::Rows {
            len: shape.last().copied().unwrap_or(n).max(1),
        }
    }
}

pub fn nuslerp(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let job = cx.job;
    let w0 = cx.model_f(0, "weight").unwrap_or(1.0);
    let w1 = cx.model_f(1, "weight").unwrap_or(1.0);
    let t = if (w0 + w1).abs() < 1e-6 {
        0.5
    } else {
        w1 / (w0 + w1)
    };
    let seg = nuslerp_segments(cx.params, cx.shape);
    let with_base = job.base.is_some();
    let vecs = if with_base {
        [Vector::Delta(0), Vector::Delta(1)]
    } else {
        [Vector::Model(0), Vector::Model(1)]
    };
    let grams = gram(b, cx, &vecs, seg)?;
    let mut terms = Vec::new();
    if with_base {
        terms.push(Vector::Base);
    }
    terms.extend(vecs);
    let mut coefs = Vec::with_capacity(grams.len() * terms.len());
    for g in &grams {
        let n0 = g[0].max(0.0).sqrt().max(1e-7);
        let n1 = g[3].max(0.0).sqrt().max(1e-7);
        let cos = (g[1] / (n0 * n1)).clamp(-1.0, 1.0);
        let (a, c) = slerp_coefs(t, cos, 1.0 - cos * cos <= 1e-16);
        if with_base {
            coefs.push(1.0);
        }
        coefs.extend([a as f32, c as f32]);
    }
    b.combine(job, &terms, seg, &coefs, out)
}

fn quad(g: &[f64], a: &[f64], c: &[f64]) -> f64 {
    let k = a.len();
    let mut s = 0.0;
    for i in 0..k {
        for j in 0..k {
            s += a[i] * g[i * k + j] * c[j];
        }
    }
    s
}

pub fn multislerp(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let job = cx.job;
    let m = job.models.len();
    if m == 1 {
        // mergekit returns the one model as it is (not added to a base)
        return b.convert(job, out);
    }
    let eps = cx.params.shared_f("eps");
    let mut w: Vec<f64> = (0..m)
        .map(|i| cx.model_f(i, "weight").unwrap_or(1.0))
        .collect();
    if cx.params.shared_b("normalize_weights") {
        let s: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= s);
    }
    let with_base = job.base.is_some();
    let vecs: Vec<Vector> = (0..m)
        .map(|i| {
            if with_base {
                Vector::Delta(i)
            } else {
                Vector::Model(i)
            }
        })
        .collect();
    let g = gram(b, cx, &vecs, Segments::Whole)?.remove(0);
    let norms: Vec<f64> = (0..m).map(|i| g[i * m + i].max(0.0).sqrt()).collect();
    let unit: Vec<f64> = norms.iter().map(|n| 1.0 / (n + eps)).collect();
    // mean of the unit vectors, as coefficients of the inputs
    let mean: Vec<f64> = (0..m).map(|i| w[i] * unit[i]).collect();
    let mean_norm = quad(&g, &mean, &mean).max(0.0).sqrt();
    let mut coefs: Vec<f64> = if mean_norm < eps {
        if m != 2 {
            return Err(cx.err(
                "multislerp: the weighted sum of the unit task vectors is zero (antipodal inputs with balancing weights); use other weights".into(),
            ));
        }
        w.clone()
    } else {
        let mhat: Vec<f64> = mean.iter().map(|x| x / mean_norm).collect();
        // U_i · m̂ for each input's unit vector
        let dots: Vec<f64> = (0..m)
            .map(|i| unit[i] * (0..m).map(|j| g[i * m + j] * mhat[j]).sum::<f64>())
            .collect();
        let along: f64 = (0..m).map(|i| w[i] * dots[i]).sum();
        let tangent: Vec<f64> = (0..m).map(|j| w[j] * unit[j] - along * mhat[j]).collect();
        let tn = quad(&g, &tangent, &tangent).max(0.0).sqrt() + eps;
        let avg_norm: f64 = (0..m).map(|i| w[i] * norms[i]).sum();
        (0..m)
            .map(|j| (mhat[j] * tn.cos() + tangent[j] * (tn.sin() / tn)) * avg_norm)
            .collect()
    };
    let mut terms = vecs;
    if with_base {
        terms.push(Vector::Base);
        coefs.push(1.0);
    }
    let coefs: Vec<f32> = coefs.iter().map(|c| *c as f32).collect();
    b.combine(job, &terms, Segments::Whole, &coefs, out)
}

pub fn karcher(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let job = cx.job;
    let m = job.models.len();
    if m == 1 {
        return b.convert(job, out);
    }
    let max_iter = cx.params.shared_f("max_iter") as usize;
    let tol = cx.params.shared_f("tol");
    let vecs: Vec<Vector> = (0..m).map(Vector::Model).collect();
    let g = gram(b, cx, &vecs, Segments::Whole)?.remove(0);
    let norms: Vec<f64> = (0..m).map(|i| g[i * m + i].max(0.0).sqrt()).collect();
    let alpha = 1.0 / m as f64;
    let valid: Vec<usize> = (0..m).filter(|&i| norms[i] > tol).collect();
    let mut c = vec![0.0f64; m];
    if !valid.is_empty() {
        let a = 1.0 / valid.len() as f64; // alphas renormalised over the valid inputs
        let unit = |i: usize| {
            let mut u = vec![0.0; m];
            u[i] = 1.0 / norms[i];
            u
        };
        for &i in &valid {
            c[i] = a / norms[i];
        }
        let mn = quad(&g, &c, &c).max(0.0).sqrt();
        c = if mn < tol {
            unit(valid[0])
        } else {
            c.iter().map(|x| x / mn).collect()
        };
        for _ in 0..max_iter {
            let mut tangent = vec![0.0f64; m];
            for &i in &valid {
                let u = unit(i);
                let dot = quad(&g, &c, &u).clamp(-1.0, 1.0);
                let theta = dot.acos();
                if theta < tol {
                    continue;
                }
                let f = a * theta / theta.sin();
                for j in 0..m {
                    tangent[j] += f * (u[j] - dot * c[j]);
                }
            }
            let tn = quad(&g, &tangent, &tangent).max(0.0).sqrt();
            if tn < tol {
                break;
            }
            for j in 0..m {
                c[j] = tn.cos() * c[j] + tn.sin() * tangent[j] / tn;
            }
            let un = quad(&g, &c, &c).max(0.0).sqrt();
            if un > tol {
                c.iter_mut().for_each(|x| *x /= un);
            }
        }
        // mergekit scales by every input's norm, zero-norm inputs included
        let scale: f64 = norms.iter().map(|n| alpha * n).sum();
        c.iter_mut().for_each(|x| *x *= scale);
    }
    let coefs: Vec<f32> = c.iter().map(|x| *x as f32).collect();
    b.combine(job, &vecs, Segments::Whole, &coefs, out)
}

/// The four spherical methods share their helpers; each is its own [`Method`].
#[derive(Debug)]
enum Sphere {
    Slerp,
    NuSlerp,
    MultiSlerp,
    Karcher,
}

impl Method for Sphere {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        match self {
            Sphere::Slerp => slerp(b, cx, out),
            Sphere::NuSlerp => nuslerp(b, cx, out),
            Sphere::MultiSlerp => multislerp(b, cx, out),
            Sphere::Karcher => karcher(b, cx, out),
        }
    }
    fn check(&self, params: &Params) -> std::result::Result<(), String> {
        match self {
            Sphere::Karcher => check_karcher(params),
            _ => Ok(()),
        }
    }
    fn align(&self, params: &Params, shape: &[usize]) -> usize {
        match self {
            Sphere::NuSlerp => nuslerp_segments(params, shape).align(),
            _ => 1,
        }
    }
}
