//! `linear`: the weighted average of the models (model soups).

use super::Ctx;
use crate::backend::Backend;
use crate::error::Result;

pub fn run(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let m = cx.job.models.len();
    let mut weights = Vec::with_capacity(m);
    for i in 0..m {
        let w = cx
            .model_f(i, "weight")
            .ok_or_else(|| cx.err(format!("model {i} has no weight")))?;
        weights.push(w as f32);
    }
    let divisor = if cx.params.shared_b("normalize") {
        // f32, summed in order, as mergekit does.
        let mut s = 0.0f32;
        weights.iter().for_each(|w| s += *w);
        if s == 0.0 || !s.is_finite() {
            return Err(cx.err(format!(
                "the weights {weights:?} sum to {s}; with `normalize: true` the merge would divide by it. \
                 Use weights with a non-zero sum or set `normalize: false`"
            )));
        }
        Some(s)
    } else {
        None
    };
    b.weighted_sum(cx.job, &weights, divisor, out)
}
