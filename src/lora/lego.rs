//! LoRA-LEGO (Zhao et al., ICLR 2025, arXiv 2409.16167): merge adapters by clustering their
//! rank-1 units.
//!
//! Each rank unit j of adapter a (a "minimal semantic unit") contributes s_a·B_a[:, j]·A_a[j, :]
//! to ΔW. smelt folds the weight and scale in as PEFT's factor methods do (√|w·s| on both
//! halves, the sign of w·s on A), fixes the unit's sign ambiguity ((A, B) and (−A, −B) are the
//! same unit) by making the largest-magnitude entry of its A half positive, and clusters the
//! vectors [A_j, B_jᵀ] of one module into k clusters by k-means (k-means++ seeding from smelt's
//! seeded generator, Lloyd iterations, the distances' cross terms a product on the backend).
//! Each cluster becomes one rank of the merged adapter: its centroid, rescaled by √n on both
//! halves for a cluster of n units, so that a cluster of identical units contributes their
//! sum (the centroid alone would shrink it n-fold; this is smelt's reading of the paper's
//! parameter reweighting, whose formulas are not published as code).
//!
//! Exact cases, tested: k = the total number of units reproduces `cat` (every unit its own
//! cluster), and merging an adapter with itself reproduces the weighted sum.

use super::adapter::Adapter;
use super::merge::{MergedAdapter, MergedModule};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::model::natural_cmp;
use crate::linalg::Mat;
use crate::rng::Stream;
use serde_json::{Map, Value};

/// k-means of the rows of `x` into `k` clusters: the assignment of each row.
pub fn kmeans(
    x: &Mat,
    k: usize,
    seed: u64,
    tag: &str,
    backend: &dyn Backend,
) -> Result<Vec<usize>> {
    let n = x.rows;
    let d = x.cols;
    let k = k.min(n);
    let sq: Vec<f64> = (0..n)
        .map(|i| {
            x.data[i * d..(i + 1) * d]
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum()
        })
        .collect();
    let dist = |i: usize, c: &[f32]| -> f64 {
        x.data[i * d..(i + 1) * d]
            .iter()
            .zip(c)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum()
    };
    // k-means++ seeding
    let stream = Stream::new(seed, &format!("lego:{tag}"), 0);
    let mut draw = 0u64;
    let mut centers: Vec<Vec<f32>> = Vec::new();
    let first = ((stream.uniform_at(draw) as f64 * n as f64) as usize).min(n - 1);
    draw += 1;
    centers.push(x.data[first * d..(first + 1) * d].to_vec());
    let mut best: Vec<f64> = (0..n).map(|i| dist(i, &centers[0])).collect();
    while centers.len() < k {
        let total: f64 = best.iter().sum();
        let pick = if total <= 0.0 {
            centers.len() // every row coincides with a center: take rows in order
        } else {
            let mut u = stream.uniform_at(draw) as f64 * total;
            let mut p = n - 1;
            for (i, b) in best.iter().enumerate() {
                if u < *b {
                    p = i;
                    break;
                }
                u -= b;
            }
            p
        };
        draw += 1;
        let c = x.data[pick * d..(pick + 1) * d].to_vec();
        for (i, b) in best.iter_mut().enumerate() {
            *b = b.min(dist(i, &c));
        }
        centers.push(c);
    }
    // Lloyd iterations: ‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖², the cross terms one product.
    let mut assign = vec![usize::MAX; n];
    for _ in 0..100 {
        let cm = Mat {
            rows: k,
            cols: d,
            data: centers.concat(),
        };
        let cross = backend.matmul(x, &cm, false, true)?;
        let csq: Vec<f64> = centers
            .iter()
            .map(|c| c.iter().map(|v| (*v as f64).powi(2)).sum())
            .collect();
        let mut changed = false;
        for i in 0..n {
            let mut bj = 0;
            let mut bd = f64::INFINITY;
            for (j, cs) in csq.iter().enumerate() {
                let dd = sq[i] - 2.0 * cross.at(i, j) as f64 + cs;
                if dd < bd {
                    bd = dd;
                    bj = j;
                }
            }
            if assign[i] != bj {
                assign[i] = bj;
                changed = true;
            }
        }
        // empty clusters take the row farthest from its center
        for j in 0..k {
            if !assign.contains(&j) {
                let far = (0..n)
                    .filter(|&i| assign.iter().filter(|&&a| a == assign[i]).count() > 1)
                    .max_by(|&a, &b| {
                        dist(a, &centers[assign[a]]).total_cmp(&dist(b, &centers[assign[b]]))
                    });
                if let Some(f) = far {
                    assign[f] = j;
                    changed = true;
                }
            }
        }
        for (j, c) in centers.iter_mut().enumerate() {
            let members: Vec<usize> = (0..n).filter(|&i| assign[i] == j).collect();
            if members.is_empty() {
                continue;
            }
            for (e, v) in c.iter_mut().enumerate() {
                *v = (members
                    .iter()
                    .map(|&i| x.data[i * d + e] as f64)
                    .sum::<f64>()
                    / members.len() as f64) as f32;
            }
        }
        if !changed {
            break;
        }
    }
    Ok(assign)
}

/// Merges `adapters` with weights into one adapter of rank `rank` by clustering rank units.
pub fn lego(
    adapters: &[&Adapter],
    weights: &[f64],
    rank: Option<usize>,
    seed: u64,
    backend: &dyn Backend,
) -> Result<MergedAdapter> {
    if adapters.is_empty() || weights.len() != adapters.len() {
        return Err(Error::Other(format!(
            "{} weights for {} adapters; give one weight per adapter",
            weights.len(),
            adapters.len()
        )));
    }
    for a in adapters {
        a.check_finite()?;
        if !a.config.modules_to_save.is_empty() {
            return Err(Error::BadModel {
                path: a.dir.clone(),
                msg: "has modules_to_save, which cannot be merged as LoRA factors".into(),
            });
        }
    }
    let mut warnings = Vec::new();
    let mut k = rank.unwrap_or_else(|| adapters.iter().map(|a| a.config.max_rank()).max().unwrap());
    if k == 0 {
        return Err(Error::Other("the merged rank must be at least 1".into()));
    }
    if rank.is_some() {
        // k clusters of a module's rank units: more clusters than the module with the most
        // units has would only pad every module with zero ranks (and a huge --rank would
        // allocate factors of that many rows).
        let mut cap = 0usize;
        for a in adapters {
            for m in &a.modules {
                let units = adapters
                    .iter()
                    .filter_map(|b| b.module(&m.name))
                    .try_fold(0usize, |s, x| s.checked_add(x.r))
                    .ok_or_else(|| {
                        Error::Other(format!(
                            "module {}: the adapters' ranks add up past what can be counted; check their adapter_config.json `r`",
                            m.name
                        ))
                    })?;
                cap = cap.max(units);
            }
        }
        let cap = cap.max(1);
        if k > cap {
            warnings.push(format!(
                "--rank {k} is more clusters than any module has rank units ({cap} at most); using {cap}"
            ));
            k = cap;
        }
    }
    let mut names: Vec<String> = adapters
        .iter()
        .flat_map(|a| a.modules.iter().map(|m| m.name.clone()))
        .collect();
    names.sort_by(|x, y| natural_cmp(x, y));
    names.dedup();
    let mut modules = Vec::new();
    for name in &names {
        let present: Vec<(usize, &super::LoraModule)> = adapters
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.module(name).map(|m| (i, m)))
            .collect();
        let m0 = present[0].1;
        let (din, dout) = (m0.a_shape[1], m0.b_shape[0]);
        for (i, m) in &present {
            if m.kind != m0.kind || m.a_shape[1] != din || m.b_shape[0] != dout {
                return Err(Error::Other(format!(
                    "module {name}: {} has factors {:?}/{:?}, {} has {:?}/{:?}; were they trained on the same base?",
                    adapters[*i].label, m.a_shape, m.b_shape, adapters[present[0].0].label, m0.a_shape, m0.b_shape
                )));
            }
        }
        // rank units as rows [A_j, B_jᵀ]
        let total = present
            .iter()
            .try_fold(0usize, |s, (_, m)| s.checked_add(m.r))
            .ok_or_else(|| {
                Error::Other(format!(
                    "module {name}: the adapters' ranks add up past what can be counted"
                ))
            })?;
        let mut x = Mat::zeros(total, din + dout);
        let mut row = 0;
        for (i, m) in &present {
            let xs = weights[*i] * m.scale;
            let root = xs.abs().sqrt() as f32;
            let sa = if xs >= 0.0 { root } else { -root };
            let a = adapters[*i].a(m);
            let b = adapters[*i].b(m);
            for j in 0..m.r {
                let mut ua: Vec<f32> = (0..din).map(|c| a.at(j, c) * sa).collect();
                let mut ub: Vec<f32> = (0..dout).map(|o| b.at(o, j) * root).collect();
                let lead = ua
                    .iter()
                    .copied()
                    .max_by(|p, q| p.abs().total_cmp(&q.abs()))
                    .unwrap_or(0.0);
                if lead < 0.0 {
                    ua.iter_mut().for_each(|v| *v = -*v);
                    ub.iter_mut().for_each(|v| *v = -*v);
                }
                x.data[row * (din + dout)..row * (din + dout) + din].copy_from_slice(&ua);
                x.data[row * (din + dout) + din..(row + 1) * (din + dout)].copy_from_slice(&ub);
                row += 1;
            }
        }
        let assign = kmeans(&x, k, seed, name, backend)?;
        let mut a = Mat::zeros(k, din);
        let mut b = Mat::zeros(dout, k);
        for c in 0..k {
            let members: Vec<usize> = (0..total).filter(|&i| assign[i] == c).collect();
            if members.is_empty() {
                continue; // fewer units than k: the rank is zero-padded
            }
            let n = members.len() as f64;
            let f = n.sqrt() / n; // √n · mean
            for e in 0..din + dout {
                let v = (members
                    .iter()
                    .map(|&i| x.data[i * (din + dout) + e] as f64)
                    .sum::<f64>()
                    * f) as f32;
                if e < din {
                    a.data[c * din + e] = v;
                } else {
                    b.data[(e - din) * k + c] = v;
                }
            }
        }
        modules.push(MergedModule {
            name: name.clone(),
            kind: m0.kind,
            a,
            b,
        });
    }
    let mut config: Map<String, Value> = adapters[0].config.raw.clone();
    config.insert("peft_type".into(), "LORA".into());
    config.insert("r".into(), k.into());
    config.insert("lora_alpha".into(), k.into());
    config.insert("use_rslora".into(), false.into());
    config.insert(
        "target_modules".into(),
        Value::Array(names.iter().map(|n| Value::String(n.clone())).collect()),
    );
    config.insert("rank_pattern".into(), Value::Object(Map::new()));
    config.insert("alpha_pattern".into(), Value::Object(Map::new()));
    Ok(MergedAdapter {
        config,
        modules,
        full: Vec::new(),
        rank: k,
        scale: 1.0,
        warnings,
    })
}
