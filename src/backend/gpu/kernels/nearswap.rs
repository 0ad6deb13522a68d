//! NearSwap: `w = clamp(t / max(|b - x|, 1e-6), 0, 1)`, `out = w·x + (1 - w)·b`.

use super::{Shader, COMMON, STORE};
use crate::backend::gpu::Gpu;
use crate::backend::Job;
use crate::error::Result;

pub const SHADER: Shader = Shader {
    name: "nearswap.wgsl",
    preludes: &[COMMON, STORE],
    body: include_str!("nearswap.wgsl"),
    entries: &["nearswap"],
    stepped: &[],
};

pub fn nearswap(gpu: &Gpu, job: &Job, t: f32, out: &mut [u8]) -> Result<()> {
    if job.numel == 0 {
        return Ok(());
    }
    gpu.launch(job, 0)?
        .header(|h| h.t = t)
        .write(&SHADER, "nearswap", out)
}
