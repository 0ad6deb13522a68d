//! `passthrough`: copy one source's tensor, optionally scaled. With `slices:` this is layer
//! stacking and layer swapping; the renaming of layers happens in the plan.

use super::params::p;
use super::{BasePolicy, Ctx, Default, Kind, Method, MethodInfo, Scope};
use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::Result;

pub fn methods() -> Vec<MethodInfo> {
    vec![MethodInfo {
        name: "passthrough",
        pretty: "Passthrough (layer swapping)",
        reference: "https://arxiv.org/abs/2410.01335",
        summary: "Copies tensors from exactly one source per slice; with `slices:` it stacks or swaps layers.",
        params: vec![p("scale", Kind::Float, Scope::Input, Default::Unset, "multiply the copied tensor by this")],
        base: BasePolicy::Ignored,
        models: (1, Some(1)),
        imp: Box::new(Passthrough),
    }]
}

#[derive(Debug)]
struct Passthrough;

impl Method for Passthrough {
    fn run(&self, b: &dyn Backend, cx: &Ctx, out: &mut [u8]) -> Result<()> {
        let job = cx.job;
        if let Some(scale) = cx.model_f(0, "scale") {
            return b.weighted_sum(job, &[scale as f32], None, out);
        }
        // A plain copy is pure I/O: bit-exact when no conversion is asked for.
        let x = &job.models[0];
        let exact = x.dtype == job.out_dtype
            && (job.load_dtype == DType::F32 || job.load_dtype == x.dtype);
        if exact {
            out.copy_from_slice(x.bytes);
            return Ok(());
        }
        b.convert(job, out)
    }
}
