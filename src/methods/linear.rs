//! `linear`: the weighted average of the models (model soups).

use super::params::p;
use super::{BasePolicy, Ctx, Default, Kind, Method, MethodInfo, Params, Scope};
use crate::backend::Backend;
use crate::error::Result;

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "linear",
        pretty: "Linear (model soup)",
        reference: "https://arxiv.org/abs/2203.05482",
        summary: "Weighted average of the models: Σ wᵢ·θᵢ / Σ wᵢ.",
        params: vec![
            p("weight", Kind::Float, Scope::Input, Default::Required, "weight of this model"),
            p("normalize", Kind::Bool, Scope::Shared, Default::Bool(true), "divide by the sum of the weights"),
        ],
        base: BasePolicy::Ignored,
        models: (1, None),
        imp: Box::new(Linear),
    }]
}

#[derive(Debug)]
struct Linear;

impl Method for Linear {
    fn check(&self, params: &Params) -> std::result::Result<(), String> {
        weights_and_divisor(params).map(|_| ())
    }

    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        let (weights, divisor) = weights_and_divisor(cx.params).map_err(|m| cx.err(m))?;
        b.weighted_sum(cx.job, &weights, divisor, out)
    }

    fn checks_inputs_on_the_way(&self) -> bool {
        true
    }
}

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
