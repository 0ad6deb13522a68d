//! `sce` (FuseChat's Select, Calculate, Erase) as mergekit 0.1.5 runs it:
//! select the elements where the task vectors disagree most (top `select_topk` of the
//! per-element variance across models, one mask for all), weight each model by the mean
//! square of its masked task vector, erase the deltas whose sign disagrees with the
//! (unweighted) majority, and average the rest by those weights.

use super::{BasePolicy, Ctx, Default, Kind, Method, MethodInfo, ParamSpec, Scope};
use crate::backend::{
    py_int_mul, Backend, Consensus, GtaSpec, Keep, Key, Query, RankCut, Source, Sparsity, Vote,
};
use crate::error::Result;

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "sce",
        pretty: "SCE (select, calculate, erase)",
        reference: "https://arxiv.org/abs/2408.07990",
        summary: "Keep the elements where the task vectors vary most, weight models by their squared task vectors, average the sign-agreeing ones.",
        params: vec![
            ParamSpec {
                name: "select_topk",
                kind: Kind::Float,
                scope: Scope::Shared,
                default: Default::Float(1.0),
                help: "fraction of the non-zero-variance elements to keep (1 keeps all)",
            },
            ParamSpec {
                name: "int8_mask",
                kind: Kind::Bool,
                scope: Scope::Shared,
                default: Default::Bool(false),
                help: "accepted for compatibility (a memory option of mergekit; no effect on results)",
            },
        ],
        base: BasePolicy::Required,
        models: (0, None),
        imp: Box::new(Sce),
    }]
}

pub fn run(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let job = cx.job;
    let m = job.models.len();
    let topk = cx.params.shared_f("select_topk");
    let keep = if m == 0 || topk >= 1.0 {
        Keep::All
    } else if topk <= 0.0 {
        Keep::Nothing
    } else {
        // k = int(count_nonzero(variance) · select_topk); the zero count is the low-level
        // histogram bin 0 of the bucket 0.
        let h = b.histogram(job, &[(Source::Variance, Some(0))])?;
        let nonzero = job.numel - h[0][0] as usize;
        let k = py_int_mul(topk, nonzero);
        if k == 0 {
            Keep::Nothing
        } else {
            let cut = b.select(
                job,
                &[Query {
                    source: Source::Variance,
                    k,
                }],
            )?[0];
            Keep::Ranks {
                lo: RankCut::NONE,
                hi: cut,
                key: Key::Variance,
            }
        }
    };
    let sp = Sparsity::new(vec![keep; m], cx.seed);
    // Weights: the mean square of each masked task vector, normalised to sum to one, or
    // uniform when they (nearly) vanish, all in f32 as mergekit computes them.
    let n = job.numel.max(1) as f64;
    let mut weights: Vec<f32> = if m == 0 {
        Vec::new()
    } else {
        b.masked_sums(job, &sp, true)?
            .iter()
            .map(|s| (s[2] / n) as f32)
            .collect()
    };
    let mut total = 0.0f32;
    weights.iter().for_each(|w| total += *w);
    if total.abs() < 1e-6 {
        weights.iter_mut().for_each(|w| *w = 1.0 / m as f32);
    } else {
        weights.iter_mut().for_each(|w| *w /= total);
    }
    b.gta(
        job,
        &GtaSpec {
            weights,
            sparsity: sp,
            scale: vec![1.0; m],
            consensus: Consensus::Sum,
            vote: Vote::Unweighted,
            normalize: true,
            div_floor: Some(1e-6),
            lambda: 1.0,
        },
        out,
    )
}

#[derive(Debug)]
struct Sce;

impl Method for Sce {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        run(b, cx, out)
    }
}
