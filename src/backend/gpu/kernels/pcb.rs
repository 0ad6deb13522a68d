//! PCB-merging ([`PcbSpec`]): per model its clamp range, β quantile and maximum (as f32
//! bits in the rank-band slots of its entry) and weight; with `beta_of` the kernel writes
//! that model's β instead of the merge.

use super::{Shader, COMMON, STORE};
use crate::backend::gpu::Gpu;
use crate::backend::{Job, PcbSpec};
use crate::error::Result;

pub const SHADER: Shader = Shader {
    name: "pcb.wgsl",
    preludes: &[COMMON, STORE],
    body: include_str!("pcb.wgsl"),
    entries: &["pcb"],
    stepped: &[],
};

pub fn pcb(
    gpu: &Gpu,
    job: &Job,
    spec: &PcbSpec,
    beta_of: Option<usize>,
    out: &mut [u8],
) -> Result<()> {
    if job.numel == 0 {
        return Ok(());
    }
    let mut k = gpu.launch(job, 0)?;
    if let Some(i) = beta_of {
        k.header.n_items = 1;
        k.header.focus = i as u32;
    }
    for (i, m) in k.models.iter_mut().enumerate() {
        m.lo_bits = spec.lo[i].to_bits();
        m.hi_bits = spec.hi[i].to_bits();
        m.lo_index = spec.q[i].to_bits();
        m.hi_index = spec.bmax[i].to_bits();
        m.weight = spec.weights[i];
    }
    k.write(&SHADER, "pcb", out)
}
