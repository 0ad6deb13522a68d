//! `tsv` — TSV-M, Task Singular Vector merging (Gargiulo et al., CVPR 2025; docs/ALGORITHMS.md
//! §15), as fusion_bench's `TaskSingularVectorMerging` computes it.
//!
//! Per 2-D tensor: the top k = int(min(m, n)·(1/T)) singular triplets of each task vector,
//! side by side; the two blocks of singular vectors are replaced by their orthogonal polar
//! factors (which removes the interference between tasks' subspaces), and
//! τ = polar(U_cat)·diag(σ_cat)·polar(Vt_cat). Other tensors: the running mean of the task
//! vectors. Per-model `weight` scales each task vector before the SVDs (fusion_bench's
//! list-valued `alpha`); the shared `alpha` scales the merged task vector afterwards.

use super::dense::{mat, vectors, write_base_plus};
use super::{BasePolicy, Ctx, Default, Kind, Method, MethodInfo, ParamSpec, Scope};
use crate::backend::{py_int_mul, Backend, Vector};
use crate::error::Result;
use crate::linalg::Mat;

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "tsv",
        pretty: "TSV-M (Task Singular Vectors merging)",
        reference: "https://arxiv.org/abs/2412.00081",
        summary: "Per matrix: the top 1/T of each task vector's singular triplets, side by side, with the singular vectors orthogonalised across tasks; other tensors averaged.",
        params: vec![
            ParamSpec {
                name: "weight",
                kind: Kind::Float,
                scope: Scope::NonBase,
                default: Default::Float(1.0),
                help: "scale of this model's task vector before the SVDs (fusion_bench's list-valued alpha)",
            },
            ParamSpec {
                name: "alpha",
                kind: Kind::Float,
                scope: Scope::Shared,
                default: Default::Float(1.0),
                help: "scale of the merged task vector (fusion_bench's scalar alpha)",
            },
        ],
        base: BasePolicy::Required,
        models: (1, None),
        imp: Box::new(Tsv),
    }]
}

/// The TSV-M task vector of 2-D task vectors `taus` (each `rows × cols`), before `alpha`.
pub fn merge_matrices(b: &dyn Backend, taus: &[Mat]) -> Result<Mat> {
    let (m, n) = (taus[0].rows, taus[0].cols);
    let full = m.min(n);
    let t = taus.len();
    // Python: int(min(m, n) * (1 / T)), the product in float64
    let k = py_int_mul(1.0 / t as f64, full) as usize;
    if k == 0 {
        return Ok(Mat::zeros(m, n));
    }
    let mut ucat = Mat::zeros(m, full);
    let mut scat = vec![0f32; full];
    let mut vcat = Mat::zeros(full, n);
    for (ti, tau) in taus.iter().enumerate() {
        let d = b.svd(tau, Some(k))?;
        let r = d.s.len().min(k);
        for j in 0..r {
            let slot = ti * k + j;
            for i in 0..m {
                ucat.data[i * full + slot] = d.u.at(i, j);
            }
            scat[slot] = d.s[j];
            vcat.data[slot * n..(slot + 1) * n].copy_from_slice(&d.vt.data[j * n..(j + 1) * n]);
        }
    }
    let pu = polar(b, &ucat)?;
    let pv = polar(b, &vcat)?;
    // (P_u · diag(σ)) · P_v
    let mut pus = pu;
    for i in 0..m {
        for (j, s) in scat.iter().enumerate() {
            pus.data[i * full + j] *= s;
        }
    }
    b.matmul(&pus, &pv, false, false)
}

/// The orthogonal polar factor U·Vt of `a`, from the backend's SVD and product.
fn polar(b: &dyn Backend, a: &Mat) -> Result<Mat> {
    let d = b.svd(a, None)?;
    b.matmul(&d.u, &d.vt, false, false)
}

pub fn run(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let job = cx.job;
    let t = job.models.len();
    let alpha = cx.params.shared_f("alpha") as f32;
    let weights: Vec<f32> = (0..t)
        .map(|i| cx.model_f(i, "weight").unwrap_or(1.0) as f32)
        .collect();
    let vecs: Vec<Vector> = (0..t).map(Vector::Delta).collect();
    let taus = vectors(b, job, &vecs, &weights)?;
    let mut tau = if let [rows, cols] = *cx.shape {
        let mats: Vec<Mat> = taus.into_iter().map(|d| mat(rows, cols, d)).collect();
        merge_matrices(b, &mats)?.data
    } else {
        // fusion_bench's running mean: m = τ_1, m += (τ_t − m)/(t + 1)
        let mut it = taus.into_iter();
        let mut mean = it.next().unwrap();
        for (i, d) in it.enumerate() {
            let c = (i + 2) as f32;
            mean.iter_mut()
                .zip(&d)
                .for_each(|(m, x)| *m += (x - *m) / c);
        }
        mean
    };
    if alpha != 1.0 {
        tau.iter_mut().for_each(|x| *x *= alpha);
    }
    write_base_plus(b, job, &tau, out)
}

#[derive(Debug)]
struct Tsv;

impl Method for Tsv {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        run(b, cx, out)
    }
}
