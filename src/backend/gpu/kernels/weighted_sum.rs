//! The weighted sum (linear): `out = (Σ_i w_i·models[i]) / divisor`.

use super::{Shader, COMMON, STORE};
use crate::backend::gpu::Gpu;
use crate::backend::Job;
use crate::error::Result;

pub const SHADER: Shader = Shader {
    name: "weighted_sum.wgsl",
    preludes: &[COMMON, STORE],
    body: include_str!("weighted_sum.wgsl"),
    entries: &["weighted_sum"],
    stepped: &[],
};

pub fn weighted_sum(
    gpu: &Gpu,
    job: &Job,
    weights: &[f32],
    divisor: Option<f32>,
    out: &mut [u8],
) -> Result<()> {
    if job.numel == 0 {
        return Ok(());
    }
    let mut k = gpu.launch(job, 0)?;
    for (m, &w) in k.models.iter_mut().zip(weights) {
        m.weight = w;
    }
    if let Some(d) = divisor {
        k.header.has_divisor = 1;
        k.header.divisor = d;
    }
    k.write(&SHADER, "weighted_sum", out)
}
