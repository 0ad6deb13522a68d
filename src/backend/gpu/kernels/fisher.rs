//! The Fisher-weighted average: models[0..M] are the weights, models[M..2M] their diagonal
//! Fisher; one coefficient per model in its entry's `weight`, the floor in the header's `t`.

use super::{Shader, COMMON, STORE};
use crate::backend::gpu::Gpu;
use crate::backend::Job;
use crate::error::Result;

pub const SHADER: Shader = Shader {
    name: "fisher.wgsl",
    preludes: &[COMMON, STORE],
    body: include_str!("fisher.wgsl"),
    entries: &["fisher"],
    stepped: &[],
};

pub fn fisher(gpu: &Gpu, job: &Job, coefs: &[f32], floor: f32, out: &mut [u8]) -> Result<()> {
    assert_eq!(
        job.models.len(),
        2 * coefs.len(),
        "fisher: a Fisher input per model"
    );
    if job.numel == 0 {
        return Ok(());
    }
    let mut k = gpu.launch(job, 0)?;
    for (m, &w) in k.models.iter_mut().zip(coefs) {
        m.weight = w;
    }
    k.header.n_items = coefs.len() as u32;
    k.header.t = floor;
    k.write(&SHADER, "fisher", out)
}
