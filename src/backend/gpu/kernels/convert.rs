//! Dtype conversion: `out = models[0]`, rounded to the load dtype, in the output dtype.

use super::{Shader, COMMON, STORE};
use crate::backend::gpu::Gpu;
use crate::backend::Job;
use crate::error::Result;

pub const SHADER: Shader = Shader {
    name: "convert.wgsl",
    preludes: &[COMMON, STORE],
    body: include_str!("convert.wgsl"),
    entries: &["convert"],
    stepped: &[],
};

pub fn convert(gpu: &Gpu, job: &Job, out: &mut [u8]) -> Result<()> {
    if job.numel == 0 {
        return Ok(());
    }
    gpu.launch(job, 0)?.write(&SHADER, "convert", out)
}
