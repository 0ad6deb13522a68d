//! How kernels are launched, in two layers:
//!
//! - [`Dispatch`]: one compute pass. Every kernel binds the same five slots of group 0
//!   (`src`, the metadata, `dst`, the tile uniform, `aux`) and maybe a step at group 1;
//!   `Dispatch::new(pipeline, tile, meta, dst).aux(..).src(..).step(..).encode(..)`.
//! - [`Launch`]: a kernel over every tile of a job. `gpu.launch(job, seed)?` takes the job's
//!   state and fills in the default metadata (the header and one entry per model), the
//!   family edits them, and [`Launch::write`] writes the output tensor or
//!   [`Launch::accumulate`] gathers per-workgroup partials into one buffer read back.
//!
//! Plus the buffer helpers both need (storage, uploads, readback).

use std::sync::{mpsc, MutexGuard};

use wgpu::util::DeviceExt;

use super::kernels::Shader;
use super::meta::{meta_bytes, MetaHeader, ModelMeta};
use super::{align4, Gpu, JobState, TileGpu, TileSpec};
use crate::backend::Job;
use crate::error::{Error, Result};

fn gpu_err(e: impl std::fmt::Display) -> Error {
    Error::Gpu(e.to_string())
}

/// One compute pass: a pipeline, what it binds, and its grid.
pub struct Dispatch<'a> {
    pipe: &'a wgpu::ComputePipeline,
    tile: &'a TileGpu,
    meta: &'a wgpu::Buffer,
    dst: &'a wgpu::Buffer,
    aux: Option<&'a wgpu::Buffer>,
    src: Option<&'a wgpu::Buffer>,
    step: Option<(&'a wgpu::BindGroup, u32)>,
}

impl<'a> Dispatch<'a> {
    /// Binds the tile's inputs as `src` and its uniform as `tile`, `meta` as the job
    /// metadata and `dst` as the output; `aux` defaults to the context's dummy buffer.
    pub fn new(
        pipe: &'a wgpu::ComputePipeline,
        tile: &'a TileGpu,
        meta: &'a wgpu::Buffer,
        dst: &'a wgpu::Buffer,
    ) -> Self {
        Dispatch {
            pipe,
            tile,
            meta,
            dst,
            aux: None,
            src: None,
            step: None,
        }
    }

    /// The operation's extra data (DELLA tables and ranks, coefficients, pairs).
    pub fn aux(mut self, aux: Option<&'a wgpu::Buffer>) -> Self {
        self.aux = aux;
        self
    }

    /// Bound as `src` instead of the tile's inputs (rank_scatter reads the sort buffer).
    pub fn src(mut self, src: &'a wgpu::Buffer) -> Self {
        self.src = Some(src);
        self
    }

    /// Group 1 of stepped kernels: the step buffer's bind group and this pass's offset.
    pub fn step(mut self, group: &'a wgpu::BindGroup, offset: u32) -> Self {
        self.step = Some((group, offset));
        self
    }

    /// Records the pass over `groups` (x, y) workgroups.
    pub fn encode(self, gpu: &Gpu, enc: &mut wgpu::CommandEncoder, groups: (u32, u32)) {
        fn entry(binding: u32, buf: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
            wgpu::BindGroupEntry {
                binding,
                resource: buf.as_entire_binding(),
            }
        }
        let bg = gpu
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &gpu.ctx.layout,
                entries: &[
                    entry(0, self.src.unwrap_or(&self.tile.src)),
                    entry(1, self.meta),
                    entry(2, self.dst),
                    entry(3, &self.tile.ubo),
                    entry(4, self.aux.unwrap_or(&gpu.ctx.dummy)),
                ],
            });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(self.pipe);
        pass.set_bind_group(0, &bg, &[]);
        if let Some((sbg, off)) = self.step {
            pass.set_bind_group(1, sbg, &[off]);
        }
        pass.dispatch_workgroups(groups.0, groups.1, 1);
    }
}

/// Work a launch does on each tile before its kernel runs (DELLA's row ranks).
type BeforeTile<'g> = Box<dyn FnMut(&Gpu, &Job, &mut JobState, usize) -> Result<()> + 'g>;

/// A kernel over the tiles of one job, holding the job's state from its metadata to its
/// last readback.
pub struct Launch<'g, 'j> {
    gpu: &'g Gpu,
    job: &'g Job<'j>,
    guard: MutexGuard<'g, Option<JobState>>,
    pub header: MetaHeader,
    /// The models' entries, then whatever entries the kernel reads after them.
    pub models: Vec<ModelMeta>,
    aux: Option<wgpu::Buffer>,
    before_tile: Option<BeforeTile<'g>>,
    only_tile: Option<usize>,
}

impl Gpu {
    /// Starts a launch on `job` with the default metadata and the random streams keyed by
    /// `seed`.
    pub(super) fn launch<'g, 'j>(&'g self, job: &'g Job<'j>, seed: u64) -> Result<Launch<'g, 'j>> {
        let guard = self.state(job)?;
        let st = guard.as_ref().unwrap();
        let header = MetaHeader::for_job(job, st, seed);
        let models = ModelMeta::for_models(job, st);
        Ok(Launch {
            gpu: self,
            job,
            guard,
            header,
            models,
            aux: None,
            before_tile: None,
            only_tile: None,
        })
    }

    pub(super) fn meta_buffer(&self, header: &MetaHeader, models: &[ModelMeta]) -> wgpu::Buffer {
        self.ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("job meta"),
                contents: &meta_bytes(header, models),
                usage: wgpu::BufferUsages::STORAGE,
            })
    }

    pub(super) fn storage(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: align4(bytes.max(16) as usize) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    pub(super) fn storage_init(&self, label: &str, words: &[u32]) -> wgpu::Buffer {
        let mut w = words.to_vec();
        w.resize(w.len().max(4), 0);
        self.ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(&w),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            })
    }

    fn readback(&self, bytes: u64) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: align4(bytes.max(16) as usize) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Maps `buf[..bytes]` after all submitted work and hands the bytes to `f`.
    fn read<R>(&self, buf: &wgpu::Buffer, bytes: u64, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let bytes = align4(bytes.max(4) as usize) as u64;
        let (tx, rx) = mpsc::channel();
        buf.slice(..bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.ctx.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("readback was abandoned".into()))?
            .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
        let r = {
            let view = buf.slice(..bytes).get_mapped_range().map_err(gpu_err)?;
            f(&view)
        };
        buf.unmap();
        Ok(r)
    }

    /// Copies `bytes` of `buf` back to the host.
    pub(super) fn download(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let rb = self.readback(bytes);
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, 0, &rb, 0, align4(bytes.max(4) as usize) as u64);
        self.ctx.queue.submit([enc.finish()]);
        self.read(&rb, bytes, |b| b[..bytes as usize].to_vec())
    }
}

/// A tile whose output is on its way back: (tile, slot, bytes, map result, submission).
type Pending = (
    usize,
    usize,
    u64,
    mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
    wgpu::SubmissionIndex,
);

impl<'g, 'j> Launch<'g, 'j> {
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// The job's state: tiles, segment offsets.
    pub fn st(&self) -> &JobState {
        self.guard.as_ref().unwrap()
    }

    /// Sets the header's fields.
    pub fn header(mut self, edit: impl FnOnce(&mut MetaHeader)) -> Self {
        edit(&mut self.header);
        self
    }

    /// Binds `aux` as the operation's extra data.
    pub fn aux(mut self, aux: wgpu::Buffer) -> Self {
        self.aux = Some(aux);
        self
    }

    /// Runs `f` on each tile before the kernel does (on the tile's own buffers).
    pub fn before_each_tile(
        mut self,
        f: impl FnMut(&Gpu, &Job, &mut JobState, usize) -> Result<()> + 'g,
    ) -> Self {
        self.before_tile = Some(Box::new(f));
        self
    }

    /// Limits [`Launch::accumulate`] to tile `t`.
    pub fn only_tile(&mut self, t: usize) {
        self.only_tile = Some(t);
    }

    /// Runs `entry` over every tile into `out` (job.out_dtype bytes), overlapping the
    /// readback of each tile with the next tile's upload and kernels.
    pub fn write(
        mut self,
        shader: &'static Shader,
        entry: &'static str,
        out: &mut [u8],
    ) -> Result<()> {
        let (gpu, job) = (self.gpu, self.job);
        if job.numel == 0 {
            return Ok(());
        }
        let st = self.guard.as_mut().unwrap();
        let pipe = gpu.ctx.pipeline(shader, entry)?;
        let meta = gpu.meta_buffer(&self.header, &self.models);
        let osz = job.out_dtype.size();
        let tile_out = align4(st.tile_elems * osz) as u64;
        let outs = [
            gpu.storage("tile out", tile_out),
            gpu.storage("tile out", tile_out),
        ];
        let rbs = [gpu.readback(tile_out), gpu.readback(tile_out)];
        let mut pending: Option<Pending> = None;
        let finish = |p: Pending, st: &JobState, out: &mut [u8]| -> Result<()> {
            let (t, slot, bytes, rx, idx) = p;
            gpu.ctx
                .device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(idx),
                    timeout: None,
                })
                .map_err(|e| Error::Gpu(format!("{}: {e}", gpu.ctx.info.name)))?;
            gpu.ctx.check()?;
            rx.recv()
                .map_err(|_| Error::Gpu("readback was abandoned".into()))?
                .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
            let spec = st.tiles[t];
            {
                let view = rbs[slot]
                    .slice(..bytes)
                    .get_mapped_range()
                    .map_err(gpu_err)?;
                out[spec.start * osz..(spec.start + spec.len) * osz]
                    .copy_from_slice(&view[..spec.len * osz]);
            }
            rbs[slot].unmap();
            Ok(())
        };
        for t in 0..st.tiles.len() {
            let slot = t % 2;
            let spec = st.tiles[t];
            if let Some(f) = self.before_tile.as_mut() {
                f(gpu, job, st, t)?;
            }
            let tg = gpu.tile_gpu(st, job, t);
            let bytes = align4(spec.len * osz) as u64;
            let mut enc = gpu.ctx.device.create_command_encoder(&Default::default());
            Dispatch::new(&pipe, tg, &meta, &outs[slot])
                .aux(self.aux.as_ref())
                .encode(gpu, &mut enc, spec.quad_grid());
            enc.copy_buffer_to_buffer(&outs[slot], 0, &rbs[slot], 0, bytes);
            let idx = gpu.ctx.queue.submit([enc.finish()]);
            let (tx, rx) = mpsc::channel();
            rbs[slot]
                .slice(..bytes)
                .map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send(r);
                });
            if let Some(p) = pending.take() {
                finish(p, st, out)?;
            }
            pending = Some((t, slot, bytes, rx, idx));
        }
        if let Some(p) = pending.take() {
            finish(p, st, out)?;
        }
        Ok(())
    }

    /// Runs `entry` over the tiles (all, or the one of [`Launch::only_tile`]) accumulating
    /// into a fresh zeroed buffer of `dst_bytes`, and reads it back. `grid` gives each
    /// tile's workgroups ([`TileSpec::quad_grid`] for one invocation per quad).
    pub fn accumulate(
        &mut self,
        shader: &'static Shader,
        entry: &'static str,
        dst_bytes: u64,
        grid: impl Fn(&TileSpec) -> (u32, u32),
    ) -> Result<Vec<u8>> {
        let (gpu, job) = (self.gpu, self.job);
        let meta = gpu.meta_buffer(&self.header, &self.models);
        let st = self.guard.as_mut().unwrap();
        let pipe = gpu.ctx.pipeline(shader, entry)?;
        let dst = gpu.storage("accumulator", dst_bytes);
        let mut enc = gpu.ctx.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&dst, 0, None);
        gpu.ctx.queue.submit([enc.finish()]);
        for t in 0..st.tiles.len() {
            if self.only_tile.is_some_and(|o| o != t) {
                continue;
            }
            if let Some(f) = self.before_tile.as_mut() {
                f(gpu, job, st, t)?;
            }
            let groups = grid(&st.tiles[t]);
            let tg = gpu.tile_gpu(st, job, t);
            let mut enc = gpu.ctx.device.create_command_encoder(&Default::default());
            Dispatch::new(&pipe, tg, &meta, &dst)
                .aux(self.aux.as_ref())
                .encode(gpu, &mut enc, groups);
            gpu.ctx.queue.submit([enc.finish()]);
        }
        gpu.download(&dst, dst_bytes)
    }
}
