//! DELLA's ranks: the ascending |delta| rank of each element within its row, for one tile,
//! by a bitonic sort of every row at once (rows padded to a power of two), each
//! compare-exchange step one dispatch with its (k, j) at a dynamic uniform offset.

use wgpu::util::DeviceExt;

use super::{Shader, COMMON};
use crate::backend::gpu::dispatch::Dispatch;
use crate::backend::gpu::meta::{MetaHeader, ModelMeta, Step};
use crate::backend::gpu::{grid, Gpu, JobState, WG};
use crate::backend::{Job, RowLayout};
use crate::error::Result;

pub const SHADER: Shader = Shader {
    name: "rank.wgsl",
    preludes: &[COMMON],
    body: include_str!("rank.wgsl"),
    entries: &["rank_init", "bitonic", "rank_scatter"],
    stepped: &["bitonic"],
};

/// Bytes between the steps of the network in the step buffer (the dynamic offset
/// alignment every adapter accepts).
const STEP_STRIDE: usize = 256;

/// One model whose rows are ranked: its rows, and the word offset of its ranks in the
/// buffer they are written to.
pub struct RowSort {
    pub model: usize,
    pub rows: RowLayout,
    pub out_offset: u32,
}

/// Sorts each model's rows of tile `t` and writes their ranks into `ranks`.
pub fn sort_rows(
    gpu: &Gpu,
    job: &Job,
    st: &mut JobState,
    t: usize,
    sorts: &[RowSort],
    ranks: &wgpu::Buffer,
) -> Result<()> {
    let spec = st.tiles[t];
    let init = gpu.ctx.pipeline(&SHADER, "rank_init")?;
    let step = gpu.ctx.pipeline(&SHADER, "bitonic")?;
    let scatter = gpu.ctx.pipeline(&SHADER, "rank_scatter")?;
    for &RowSort {
        model,
        rows,
        out_offset,
    } in sorts
    {
        let pad = rows.len.next_power_of_two();
        let rows_in_tile = spec.len / rows.slab().max(1) * rows.inner;
        let entries = rows_in_tile * pad;
        if entries == 0 {
            continue;
        }
        let mut h = MetaHeader::for_job(job, st, 0);
        h.focus = model as u32;
        h.row_len = rows.len as u32;
        h.row_inner = rows.inner as u32;
        h.row_pad = pad as u32;
        h.n_entries = entries as u32;
        h.out_offset = out_offset;
        let meta = gpu.meta_buffer(&h, &ModelMeta::for_models(job, st));
        let sort = gpu.storage("row sort", entries as u64 * 8);
        // every (k, j) step of the network, STEP_STRIDE bytes apart
        let mut steps: Vec<u8> = Vec::new();
        let mut k = 2;
        while k <= pad {
            let mut j = k / 2;
            while j > 0 {
                let s = Step {
                    k: k as u32,
                    j: j as u32,
                    ..Default::default()
                };
                steps.extend_from_slice(bytemuck::bytes_of(&s));
                steps.resize(steps.len() + STEP_STRIDE - size_of::<Step>(), 0);
                j /= 2;
            }
            k *= 2;
        }
        let n_steps = steps.len() / STEP_STRIDE;
        steps.resize(steps.len().max(STEP_STRIDE), 0);
        let step_buf = gpu
            .ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("bitonic steps"),
                contents: &steps,
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let step_bg = gpu
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &gpu.ctx.step_layout,
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &step_buf,
                        offset: 0,
                        size: wgpu::BufferSize::new(size_of::<Step>() as u64),
                    }),
                }],
            });
        let groups = grid(entries.div_ceil(WG), gpu.max_dim());
        let tg = gpu.tile_gpu(st, job, t);
        let mut enc = gpu.ctx.device.create_command_encoder(&Default::default());
        Dispatch::new(&init, tg, &meta, &sort).encode(gpu, &mut enc, groups);
        for s in 0..n_steps {
            Dispatch::new(&step, tg, &meta, &sort)
                .step(&step_bg, (s * STEP_STRIDE) as u32)
                .encode(gpu, &mut enc, groups);
        }
        Dispatch::new(&scatter, tg, &meta, ranks)
            .src(&sort)
            .encode(gpu, &mut enc, groups);
        gpu.ctx.queue.submit([enc.finish()]);
    }
    Ok(())
}
