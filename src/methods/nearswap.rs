//! `nearswap`: take the fine-tune's value where it is close to the base, the base's where
//! they are far apart: w = clamp(t / |base - x|, 0, 1), out = w·x + (1 - w)·base.

use super::{BasePolicy, Ctx, Default, Kind, Method, MethodInfo, ParamSpec, Scope};
use crate::backend::Backend;
use crate::error::Result;

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "nearswap",
        pretty: "NearSwap",
        reference: "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        summary: "Interpolate toward the other model only where it is within t of the base.",
        params: vec![ParamSpec {
            name: "t",
            kind: Kind::Float,
            scope: Scope::Shared,
            default: Default::Required,
            help: "distance scale: elements closer than t take the other model's value",
        }],
        base: BasePolicy::Required,
        models: (1, Some(1)),
        imp: Box::new(NearSwap),
    }]
}

#[derive(Debug)]
struct NearSwap;

impl Method for NearSwap {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        b.nearswap(cx.job, cx.params.shared_f("t") as f32, out)
    }
}
