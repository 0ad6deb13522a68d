//! `linear`: the weighted average of the models (model soups).

use super::{Ctx, Params};
use crate::backend::Backend;
use crate::error::Result;

/// The weights as f32 and, with `normalize`, their f32 sum (mergekit divides by exactly that).
fn weights_and_divisor(params: &Params) -> std::result::Result<(Vec<f32>, Option<f32>), String> {
    let mut weights = Vec::with_capacity(params.per_input.len());
    for i in 0..params.per_input.len() {
        let w = params
            .input_f(i, "weight")
            .ok_or_else(|| format!("input {i} has no weight"))?;
        weights.push(w as f32);
    }
    if !params.shared_b("normalize") {
        return Ok((weights, None));
    }
    let mut s = 0.0f32;
    weights.iter().for_each(|w| s += *w);
    if s == 0.0 || !s.is_finite() {
        return Err(format!(
            "the weights {weights:?} sum to {s}; with `normalize: true` the merge would divide by it. \
             Use weights with a non-zero sum or set `normalize: false`"
        ));
    }
    Ok((weights, Some(s)))
}

pub fn check(params: &Params) -> std::result::Result<(), String> {
    weights_and_divisor(params).map(|_| ())
}

pub fn run(b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
    let (weights, divisor) = weights_and_divisor(cx.params).map_err(|m| cx.err(m))?;
    b.weighted_sum(cx.job, &weights, divisor, out)
}
