//! ComPEFT's ternarisation: `sign(models[0] − base)` where its magnitude reaches the
//! threshold (compared as f32 bits), 0 elsewhere.

use super::{Shader, COMMON, STORE};
use crate::backend::gpu::Gpu;
use crate::backend::Job;
use crate::error::Result;

pub const SHADER: Shader = Shader {
    name: "ternary.wgsl",
    preludes: &[COMMON, STORE],
    body: include_str!("ternary.wgsl"),
    entries: &["ternary"],
    stepped: &[],
};

pub fn ternary(gpu: &Gpu, job: &Job, threshold: u32, out: &mut [u8]) -> Result<()> {
    if job.numel == 0 {
        return Ok(());
    }
    gpu.launch(job, 0)?
        .header(|h| h.t = f32::from_bits(threshold))
        .write(&SHADER, "ternary", out)
}
