//! The GPU backend on wgpu: the same primitives as the CPU, as WGSL compute kernels.
//!
//! A job's inputs travel in tiles of whole quads (4 elements), each tile one storage buffer
//! holding every input's raw bytes (only input-dtype bytes go up). Tiles are sized from the
//! adapter's binding limit (or a test override) and hold whole rows when a method ranks
//! within rows. When all of a job's tiles fit in the VRAM budget they are uploaded once and
//! stay resident across the job's passes (selection histograms, norms, the combine);
//! otherwise two tile slots stream, with the upload of the next tile and the readback of the
//! previous one overlapping the current one's kernels.

pub mod context;
pub mod shaders;

use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use super::{
    Backend, Consensus, Fused, GtaSpec, Input, Job, Keep, Key, PcbSpec, RowLayout, Segments, Source,
    Sparsity, Vector, Vote,
};
use crate::error::{Error, Result};
use crate::linalg::{Mat, Svd};
use crate::rng::fnv1a32;
pub use context::{list_adapters, AdapterDesc, GpuContext};
use shaders::Shader;

/// Invocations per workgroup; each handles one quad in elementwise kernels.
const WG: usize = 256;
/// Elements per workgroup of an elementwise kernel.
const WG_ELEMS: usize = 4 * WG;

#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Adapter index (from `smelt devices`) or part of its name.
    pub adapter: Option<String>,
    /// Bytes of input tiles a job may keep resident; larger jobs stream. Default 2 GiB.
    pub vram_budget: Option<u64>,
    /// Largest tile in elements (tests use small tiles to force streaming).
    pub tile_elems: Option<usize>,
}

/// Mirrors `struct Meta` of shaders/common.wgsl (without the trailing array).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct MetaHeader {
    n_models: u32,
    base_offset: u32,
    base_dtype: u32,
    load_dtype: u32,
    out_dtype: u32,
    consensus: u32,
    normalize: u32,
    lambda: f32,
    wsum: f32,
    seed_lo: u32,
    seed_hi: u32,
    name_hash: u32,
    has_divisor: u32,
    divisor: f32,
    focus: u32,
    vote: u32,
    floor_on: u32,
    div_floor: f32,
    inv_m: f32,
    use_var: u32,
    seg_kind: u32,
    seg_len: u32,
    n_items: u32,
    n_pairs: u32,
    t: f32,
    row_len: u32,
    row_inner: u32,
    row_pad: u32,
    n_entries: u32,
    out_offset: u32,
    _p2: u32,
    _p3: u32,
}

/// Mirrors `struct ModelMeta` of shaders/common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct ModelMeta {
    offset: u32,
    dtype: u32,
    keep: u32,
    rng_model: u32,
    lo_bits: u32,
    lo_index: u32,
    hi_bits: u32,
    hi_index: u32,
    thr: u32,
    weight: f32,
    scale: f32,
    aux: u32,
    ranks: u32,
    table: u32,
    _p0: u32,
    _p1: u32,
}

/// Mirrors `struct Tile` of shaders/common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct TileUbo {
    n: u32,
    start: u32,
    _g: u32,
    wg_base: u32,
    index: u32,
    _p: [u32; 3],
}

#[derive(Clone, Copy, Debug)]
struct TileSpec {
    start: usize,
    len: usize,
    groups_x: u32,
    groups_y: u32,
    wg_base: u32,
}

impl TileSpec {
    fn groups(&self) -> u32 {
        self.groups_x * self.groups_y
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

struct TileGpu {
    src: wgpu::Buffer,
    ubo: wgpu::Buffer,
}

/// What the backend keeps of the job in hand.
struct JobState {
    id: u64,
    tile_elems: usize,
    tiles: Vec<TileSpec>,
    /// Word offset of each input's segment: models 0..M, then the base.
    seg_off: Vec<u32>,
    src_bytes: u64,
    resident: bool,
    /// Resident: one per tile. Streaming: two slots.
    bufs: Vec<TileGpu>,
    /// Which tile each buffer holds.
    holds: Vec<Option<usize>>,
    total_groups: u32,
}

/// What one dispatch binds besides the tile and the metadata.
struct Binding<'a> {
    dst: &'a wgpu::Buffer,
    aux: Option<&'a wgpu::Buffer>,
    /// Bound as `src` instead of the tile's inputs (rank_scatter reads the sort buffer).
    src: Option<&'a wgpu::Buffer>,
    /// Group 1 of stepped kernels: the step buffer and this dispatch's offset.
    step: Option<(&'a wgpu::BindGroup, u32)>,
}

pub struct Gpu {
    pub ctx: Arc<GpuContext>,
    tile_cap: usize,
    budget: u64,
    state: Mutex<Option<JobState>>,
    /// Test hook (`SMELT_FAULT_GPU_AFTER=N`): every job after the N-th fails as if the device
    /// were lost, to exercise the fallback to the CPU.
    fault_after: Option<u64>,
    jobs: std::sync::atomic::AtomicU64,
}

fn align4(x: usize) -> usize {
    x.div_ceil(4) * 4
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// (x, y) workgroups covering `groups`, x at most `max_dim`.
fn grid(groups: usize, max_dim: u32) -> (u32, u32) {
    let groups = groups.max(1) as u32;
    let x = groups.min(max_dim.max(1));
    (x, groups.div_ceil(x))
}

/// Little-endian words of downloaded bytes (a byte vector need not be 4-aligned for a cast).
fn words(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn gpu_err(e: impl std::fmt::Display) -> Error {
    Error::Gpu(e.to_string())
}

impl Gpu {
    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        let ctx = Arc::new(GpuContext::new(opts.adapter.as_deref())?);
        Ok(Gpu::with_context(ctx, opts))
    }

    /// A backend on an existing context (several backends with different tile sizes or
    /// budgets can share one device; `opts.adapter` is not consulted).
    pub fn with_context(ctx: Arc<GpuContext>, opts: &GpuOptions) -> Gpu {
        Gpu {
            ctx,
            tile_cap: opts.tile_elems.unwrap_or(usize::MAX).max(4),
            budget: opts.vram_budget.unwrap_or(2 << 30),
            state: Mutex::new(None),
            fault_after: std::env::var("SMELT_FAULT_GPU_AFTER")
                .ok()
                .and_then(|v| v.parse().ok()),
            jobs: Default::default(),
        }
    }

    /// How the backend would cut a job: (elements per tile, tiles, resident).
    pub fn tiling(&self, job: &Job) -> Result<(usize, usize, bool)> {
        let st = self.plan_job(job)?;
        Ok((st.tile_elems, st.tiles.len(), st.resident))
    }

    pub fn pipelines_built(&self) -> usize {
        self.ctx.pipelines_built()
    }

    /// Inputs in segment order: models, then the base.
    fn inputs<'a>(job: &'a Job) -> Vec<&'a Input<'a>> {
        job.models.iter().chain(job.base.iter()).collect()
    }

    fn max_dim(&self) -> u32 {
        self.ctx.limits.max_compute_workgroups_per_dimension
    }

    fn plan_job(&self, job: &Job) -> Result<JobState> {
        let inputs = Self::inputs(job);
        let per_elem: usize = inputs.iter().map(|i| i.dtype.size()).sum::<usize>().max(4);
        let limit = (self.ctx.limits.max_storage_buffer_binding_size as usize)
            .min(self.ctx.limits.max_buffer_size as usize);
        let n = job.numel;
        // Tiles hold whole 1024-element blocks (so every reduction's partial sums fall on the
        // same global blocks whatever the tile size) and whole rows of `align`. Where that
        // unit is too large, whole quads and rows still keep the results right.
        let mut hard = limit / per_elem;
        if job.align > 1 {
            // row sorts need 8 bytes per entry, rows padded up to twice their length
            hard = hard.min(limit / 16);
        }
        let lcm = |a: usize, b: usize| a / gcd(a, b) * b;
        let unit = [lcm(WG_ELEMS, job.align), lcm(4, job.align)]
            .into_iter()
            .find(|&u| u <= hard)
            .ok_or_else(|| {
                Error::Gpu(format!(
                    "{}: rows of {} elements do not fit one GPU tile of {hard} elements",
                    job.name, job.align
                ))
            })?;
        // The requested tile size yields to the unit; the binding limit does not.
        let mut tile = (hard.min(self.tile_cap) / unit).max(1) * unit;
        tile = tile.min(n.div_ceil(unit).max(1) * unit);
        let mut seg_off = Vec::with_capacity(inputs.len());
        let mut words = 0u32;
        for i in &inputs {
            seg_off.push(words);
            words += (align4(tile * i.dtype.size()) / 4).div_ceil(4) as u32 * 4;
        }
        let mut tiles = Vec::new();
        let mut wg_base = 0u32;
        let mut start = 0;
        while start < n {
            let len = tile.min(n - start);
            let (groups_x, groups_y) = grid(len.div_ceil(WG_ELEMS), self.max_dim());
            tiles.push(TileSpec {
                start,
                len,
                groups_x,
                groups_y,
                wg_base,
            });
            wg_base += groups_x * groups_y;
            start += len;
        }
        let src_bytes = (words.max(4) as u64) * 4;
        let resident = src_bytes * tiles.len() as u64 <= self.budget;
        Ok(JobState {
            id: job.id,
            tile_elems: tile,
            tiles,
            seg_off,
            src_bytes,
            resident,
            bufs: Vec::new(),
            holds: Vec::new(),
            total_groups: wg_base,
        })
    }

    fn state(&self, job: &Job) -> Result<MutexGuard<'_, Option<JobState>>> {
        let mut g = self.state.lock().unwrap();
        if g.as_ref().map(|s| s.id) != Some(job.id) {
            let seen = self.jobs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.fault_after.is_some_and(|n| seen >= n) {
                return Err(Error::Gpu(format!(
                    "{}: device lost (injected by SMELT_FAULT_GPU_AFTER)",
                    self.ctx.info.name
                )));
            }
            *g = Some(self.plan_job(job)?);
        }
        Ok(g)
    }

    /// The buffers holding tile `t`, uploading it if they do not already.
    fn tile_gpu<'s>(&self, st: &'s mut JobState, job: &Job, t: usize) -> &'s TileGpu {
        let slot = if st.resident { t } else { t % 2 };
        while st.bufs.len() <= slot {
            let src = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tile inputs"),
                size: st.src_bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let ubo = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tile"),
                size: std::mem::size_of::<TileUbo>() as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            st.bufs.push(TileGpu { src, ubo });
            st.holds.push(None);
        }
        if st.holds[slot] != Some(t) {
            let spec = st.tiles[t];
            let tg = &st.bufs[slot];
            for (k, input) in Self::inputs(job).into_iter().enumerate() {
                let s = input.dtype.size();
                let bytes = &input.bytes[spec.start * s..(spec.start + spec.len) * s];
                let off = st.seg_off[k] as u64 * 4;
                if bytes.len() % 4 == 0 {
                    self.ctx.queue.write_buffer(&tg.src, off, bytes);
                } else {
                    let mut padded = bytes.to_vec();
                    padded.resize(align4(bytes.len()), 0);
                    self.ctx.queue.write_buffer(&tg.src, off, &padded);
                }
            }
            let ubo = TileUbo {
                n: spec.len as u32,
                start: spec.start as u32,
                _g: 0,
                wg_base: spec.wg_base,
                index: t as u32,
                _p: [0; 3],
            };
            self.ctx
                .queue
                .write_buffer(&tg.ubo, 0, bytemuck::bytes_of(&ubo));
            st.holds[slot] = Some(t);
        }
        &st.bufs[slot]
    }

    fn header(&self, job: &Job, st: &JobState, seed: u64) -> MetaHeader {
        let m = job.models.len();
        MetaHeader {
            n_models: m as u32,
            base_offset: if job.base.is_some() { st.seg_off[m] } else { 0 },
            base_dtype: job.base.map(|b| b.dtype.code()).unwrap_or(0),
            load_dtype: job.load_dtype.code(),
            out_dtype: job.out_dtype.code(),
            lambda: 1.0,
            wsum: 1.0,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            name_hash: fnv1a32(job.name),
            inv_m: if m > 0 { 1.0 / m as f32 } else { 0.0 },
            ..Default::default()
        }
    }

    /// An elementwise gta.wgsl kernel whose only inputs are one scalar per model (in its
    /// `weight` slot, leading models first) and header fields that `edit` sets.
    fn apply_weighted(
        &self,
        job: &Job,
        entry: &'static str,
        per_model: &[f32],
        out: &mut [u8],
        edit: impl FnOnce(&mut MetaHeader),
    ) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        let (header, models) = {
            let mut guard = self.state(job)?;
            let st = guard.as_mut().unwrap();
            let mut h = self.header(job, st, 0);
            edit(&mut h);
            let mut models = self.models_meta(job, st);
            for (m, &w) in models.iter_mut().zip(per_model) {
                m.weight = w;
            }
            (h, models)
        };
        self.apply(job, (Shader::Gta, entry), header, models, None, None, out)
    }

    /// Metadata of every model, in order (the head of the `models` array of every kernel).
    fn models_meta(&self, job: &Job, st: &JobState) -> Vec<ModelMeta> {
        (0..job.models.len())
            .map(|i| ModelMeta {
                offset: st.seg_off[i],
                dtype: job.models[i].dtype.code(),
                rng_model: i as u32,
                weight: 1.0,
                scale: 1.0,
                ..Default::default()
            })
            .collect()
    }

    fn meta_buffer(&self, header: &MetaHeader, models: &[ModelMeta]) -> wgpu::Buffer {
        let mut bytes = bytemuck::bytes_of(header).to_vec();
        if models.is_empty() {
            bytes.extend_from_slice(bytemuck::bytes_of(&ModelMeta::default()));
        }
        for m in models {
            bytes.extend_from_slice(bytemuck::bytes_of(m));
        }
        self.ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("job meta"),
                contents: &bytes,
                usage: wgpu::BufferUsages::STORAGE,
            })
    }

    fn storage(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: align4(bytes.max(16) as usize) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    fn storage_init(&self, label: &str, words: &[u32]) -> wgpu::Buffer {
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

    #[allow(clippy::too_many_arguments)]
    fn encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        pipe: &wgpu::ComputePipeline,
        tg: &TileGpu,
        meta: &wgpu::Buffer,
        b: &Binding,
        groups: (u32, u32),
    ) {
        let bg = self
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &self.ctx.layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: b.src.unwrap_or(&tg.src).as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: meta.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: b.dst.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 3,
                        resource: tg.ubo.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 4,
                        resource: b.aux.unwrap_or(&self.ctx.dummy).as_entire_binding(),
                    },
                ],
            });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(pipe);
        pass.set_bind_group(0, &bg, &[]);
        if let Some((sbg, off)) = b.step {
            pass.set_bind_group(1, sbg, &[off]);
        }
        pass.dispatch_workgroups(groups.0, groups.1, 1);
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
    fn download(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let rb = self.readback(bytes);
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, 0, &rb, 0, align4(bytes.max(4) as usize) as u64);
        self.ctx.queue.submit([enc.finish()]);
        self.read(&rb, bytes, |b| b[..bytes as usize].to_vec())
    }

    /// Runs a kernel over tiles (all, or one) accumulating into a fresh zeroed buffer of
    /// `dst_bytes`, then reads it back. `per_tile` may prepare an aux buffer for each tile
    /// and choose the tile's grid.
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        &self,
        job: &Job,
        st: &mut JobState,
        kernel: (Shader, &'static str),
        meta: &wgpu::Buffer,
        dst_bytes: u64,
        only_tile: Option<usize>,
        mut per_tile: impl FnMut(
            &Self,
            &mut JobState,
            usize,
        ) -> Result<(Option<wgpu::Buffer>, (u32, u32))>,
    ) -> Result<Vec<u8>> {
        let pipe = self.ctx.pipeline(kernel.0, kernel.1)?;
        let dst = self.storage("accumulator", dst_bytes);
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&dst, 0, None);
        self.ctx.queue.submit([enc.finish()]);
        for t in 0..st.tiles.len() {
            if only_tile.is_some_and(|o| o != t) {
                continue;
            }
            let (aux, groups) = per_tile(self, st, t)?;
            let tg = self.tile_gpu(st, job, t);
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            let b = Binding {
                dst: &dst,
                aux: aux.as_ref(),
                src: None,
                step: None,
            };
            self.encode(&mut enc, &pipe, tg, meta, &b, groups);
            self.ctx.queue.submit([enc.finish()]);
        }
        self.download(&dst, dst_bytes)
    }

    /// The quad grid of tile t.
    fn quad_grid(st: &JobState, t: usize) -> (u32, u32) {
        let s = st.tiles[t];
        (s.groups_x, s.groups_y)
    }

    /// Runs an output-writing kernel over every tile into `out`, overlapping the readback
    /// of each tile with the next tile's upload and kernels.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        job: &Job,
        kernel: (Shader, &'static str),
        header: MetaHeader,
        models: Vec<ModelMeta>,
        aux: Option<&wgpu::Buffer>,
        della: Option<&Della>,
        out: &mut [u8],
    ) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        let mut guard = self.state(job)?;
        let st = guard.as_mut().unwrap();
        let pipe = self.ctx.pipeline(kernel.0, kernel.1)?;
        let meta = self.meta_buffer(&header, &models);
        let osz = job.out_dtype.size();
        let tile_out = align4(st.tile_elems * osz) as u64;
        let outs = [
            self.storage("tile out", tile_out),
            self.storage("tile out", tile_out),
        ];
        let rbs = [self.readback(tile_out), self.readback(tile_out)];
        let mut pending: Option<Pending> = None;
        let finish = |p: Pending, st: &JobState, out: &mut [u8]| -> Result<()> {
            let (t, slot, bytes, rx, idx) = p;
            self.ctx
                .device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(idx),
                    timeout: None,
                })
                .map_err(|e| Error::Gpu(format!("{}: {e}", self.ctx.info.name)))?;
            self.ctx.check()?;
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
            if let Some(d) = della {
                self.della_ranks(job, st, t, d)?;
            }
            let tg = self.tile_gpu(st, job, t);
            let bytes = align4(spec.len * osz) as u64;
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            let b = Binding {
                dst: &outs[slot],
                aux: della.map(|d| &d.aux).or(aux),
                src: None,
                step: None,
            };
            self.encode(
                &mut enc,
                &pipe,
                tg,
                &meta,
                &b,
                (spec.groups_x, spec.groups_y),
            );
            enc.copy_buffer_to_buffer(&outs[slot], 0, &rbs[slot], 0, bytes);
            let idx = self.ctx.queue.submit([enc.finish()]);
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

    /// Fills the model metadata of a sparsity, and prepares DELLA's tables and rank space.
    fn sparsity_meta(
        &self,
        st: &JobState,
        sp: &Sparsity,
        models: &mut [ModelMeta],
    ) -> Option<Della> {
        let mut della = Vec::new();
        let mut words: Vec<u32> = Vec::new();
        let mut table_off = Vec::new();
        for t in &sp.tables {
            table_off.push(words.len() as u32);
            words.extend_from_slice(t);
        }
        let ranks_start = words.len() as u32;
        for (i, (m, k)) in models.iter_mut().zip(&sp.keep).enumerate() {
            match *k {
                Keep::All => m.keep = 0,
                Keep::Nothing => m.keep = 1,
                Keep::Ranks { lo, hi, key } => {
                    m.keep = if key == Key::Delta { 2 } else { 4 };
                    m.lo_bits = lo.bits;
                    m.lo_index = lo.index;
                    m.hi_bits = hi.bits;
                    m.hi_index = hi.index;
                }
                Keep::Random { p } => {
                    m.keep = 3;
                    m.thr = super::keep_threshold(p);
                }
                Keep::Della { rows, table } => {
                    m.keep = 5;
                    m.table = table_off[table];
                    m.ranks = ranks_start + (della.len() * st.tile_elems) as u32;
                    della.push((i, rows, m.ranks));
                }
            }
        }
        if della.is_empty() {
            return None;
        }
        let total = ranks_start as usize + della.len() * st.tile_elems;
        words.resize(total, 0);
        Some(Della {
            aux: self.storage_init("della tables and ranks", &words),
            models: della,
        })
    }

    /// Sorts each DELLA model's rows of tile t and writes their ranks into `d.aux`.
    fn della_ranks(&self, job: &Job, st: &mut JobState, t: usize, d: &Della) -> Result<()> {
        let spec = st.tiles[t];
        let init = self.ctx.pipeline(Shader::Rank, "rank_init")?;
        let step = self.ctx.pipeline(Shader::Rank, "bitonic")?;
        let scatter = self.ctx.pipeline(Shader::Rank, "rank_scatter")?;
        for &(model, rows, out_offset) in &d.models {
            let pad = rows.len.next_power_of_two();
            let rows_in_tile = spec.len / rows.slab().max(1) * rows.inner;
            let entries = rows_in_tile * pad;
            if entries == 0 {
                continue;
            }
            let mut h = self.header(job, st, 0);
            h.focus = model as u32;
            h.row_len = rows.len as u32;
            h.row_inner = rows.inner as u32;
            h.row_pad = pad as u32;
            h.n_entries = entries as u32;
            h.out_offset = out_offset;
            let meta = self.meta_buffer(&h, &self.models_meta(job, st));
            let sort = self.storage("row sort", entries as u64 * 8);
            // every (k, j) step of the network, 256 bytes apart for dynamic offsets
            let mut steps: Vec<u32> = Vec::new();
            let mut k = 2;
            while k <= pad {
                let mut j = k / 2;
                while j > 0 {
                    let mut s = vec![0u32; 64];
                    s[0] = k as u32;
                    s[1] = j as u32;
                    steps.extend(s);
                    j /= 2;
                }
                k *= 2;
            }
            let n_steps = steps.len() / 64;
            steps.resize(steps.len().max(64), 0);
            let step_buf = self
                .ctx
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("bitonic steps"),
                    contents: bytemuck::cast_slice(&steps),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            let step_bg = self
                .ctx
                .device
                .create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &self.ctx.step_layout,
                    entries: &[wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &step_buf,
                            offset: 0,
                            size: wgpu::BufferSize::new(16),
                        }),
                    }],
                });
            let groups = grid(entries.div_ceil(WG), self.max_dim());
            let tg = self.tile_gpu(st, job, t);
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            let plain = |dst| Binding {
                dst,
                aux: None,
                src: None,
                step: None,
            };
            self.encode(&mut enc, &init, tg, &meta, &plain(&sort), groups);
            for s in 0..n_steps {
                let b = Binding {
                    dst: &sort,
                    aux: None,
                    src: None,
                    step: Some((&step_bg, (s * 256) as u32)),
                };
                self.encode(&mut enc, &step, tg, &meta, &b, groups);
            }
            let b = Binding {
                dst: &d.aux,
                aux: None,
                src: Some(&sort),
                step: None,
            };
            self.encode(&mut enc, &scatter, tg, &meta, &b, groups);
            self.ctx.queue.submit([enc.finish()]);
        }
        Ok(())
    }

    /// An elementwise gta-shader kernel whose only parameter is the header's `t`.
    fn apply_with_t(&self, job: &Job, entry: &'static str, t: f32, out: &mut [u8]) -> Result<()> {
        self.apply_weighted(job, entry, &[], out, |h| h.t = t)
    }

    /// Model metadata with vector entries appended: (header n_items set by the caller).
    fn vector_meta(&self, job: &Job, st: &JobState, vecs: &[Vector]) -> Vec<ModelMeta> {
        let mut m = self.models_meta(job, st);
        for v in vecs {
            let (aux, model) = match *v {
                Vector::Model(i) => (0, i),
                Vector::Base => (1, 0),
                Vector::Delta(i) => (2, i),
                Vector::Ones => (3, 0),
            };
            m.push(ModelMeta {
                aux,
                rng_model: model as u32,
                ..Default::default()
            });
        }
        m
    }

    fn segment_header(h: &mut MetaHeader, seg: Segments) {
        let (kind, len) = match seg {
            Segments::Whole => (0, 0),
            Segments::Rows { len } => (1, len),
            Segments::Cols { cols } => (2, cols),
        };
        h.seg_kind = kind;
        h.seg_len = len as u32;
    }
}

impl Gpu {
    /// The tiled product kernel; problems larger than one storage binding go to the CPU.
    fn gpu_matmul(&self, a: &Mat, b: &Mat, ta: bool, tb: bool) -> Result<Mat> {
        let (m, k1) = if ta {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (k2, n) = if tb {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        if k1 != k2 {
            return Err(Error::Other(format!(
                "matrix product of {m}x{k1} and {k2}x{n}: inner dimensions differ"
            )));
        }
        if m == 0 || n == 0 || k1 == 0 {
            return Ok(Mat::zeros(m, n));
        }
        let limit = self.ctx.limits.max_storage_buffer_binding_size as usize;
        let max_dim = self.max_dim() as usize;
        if (a.data.len() + b.data.len()) * 4 > limit
            || m * n * 4 > limit
            || n.div_ceil(16) > max_dim
            || m.div_ceil(16) > max_dim
        {
            log::debug!(
                "{m}x{k1}x{n} product is larger than a GPU binding; computing it on the CPU"
            );
            return crate::linalg::matmul(a, b, ta, tb);
        }
        let words: Vec<u32> = a.data.iter().chain(&b.data).map(|x| x.to_bits()).collect();
        let src = self.storage_init("matmul inputs", &words);
        let ubo = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused tile"),
            size: std::mem::size_of::<TileUbo>() as u64,
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: false,
        });
        let tg = TileGpu { src, ubo };
        let h = MetaHeader {
            n_items: m as u32,
            n_pairs: n as u32,
            row_len: k1 as u32,
            row_pad: a.cols as u32,
            n_entries: b.cols as u32,
            out_offset: a.data.len() as u32,
            row_inner: ta as u32 | (tb as u32) << 1,
            ..Default::default()
        };
        let meta = self.meta_buffer(&h, &[]);
        let dst = self.storage("matmul output", (m * n * 4) as u64);
        let pipe = self.ctx.pipeline(Shader::Matmul, "matmul")?;
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        let binding = Binding {
            dst: &dst,
            aux: None,
            src: None,
            step: None,
        };
        self.encode(
            &mut enc,
            &pipe,
            &tg,
            &meta,
            &binding,
            (n.div_ceil(16) as u32, m.div_ceil(16) as u32),
        );
        self.ctx.queue.submit([enc.finish()]);
        let bytes = self.download(&dst, (m * n * 4) as u64)?;
        Ok(Mat {
            rows: m,
            cols: n,
            data: floats(&bytes),
        })
    }
}

/// DELLA's aux buffer (threshold tables, then one tile of ranks per DELLA model) and which
/// models need ranks: (model, rows, word offset of its ranks).
struct Della {
    aux: wgpu::Buffer,
    models: Vec<(usize, RowLayout, u32)>,
}

impl Backend for Gpu {
    fn name(&self) -> String {
        format!("gpu: {} ({})", self.ctx.info.name, self.ctx.info.backend)
    }

    fn histogram(&self, job: &Job, sources: &[(Source, Option<u32>)]) -> Result<Vec<Vec<u64>>> {
        if job.numel == 0 {
            return Ok(vec![vec![0; 1 << 16]; sources.len()]);
        }
        let mut guard = self.state(job)?;
        let st = guard.as_mut().unwrap();
        let mut out = Vec::with_capacity(sources.len());
        // At most 64 sources per pass keeps the histogram buffer at 16 MiB.
        for group in sources.chunks(64) {
            let mut models = self.models_meta(job, st);
            let mut header = self.header(job, st, 0);
            for (s, filter) in group {
                let mut e = match *s {
                    Source::Delta(i) => ModelMeta {
                        aux: 0,
                        ..models[i]
                    },
                    Source::Model(i) => ModelMeta {
                        aux: 1,
                        ..models[i]
                    },
                    Source::Variance => {
                        header.use_var = 1;
                        ModelMeta {
                            aux: 4,
                            ..Default::default()
                        }
                    }
                };
                if let Some(hb) = filter {
                    e.aux |= 2;
                    e.lo_bits = *hb;
                }
                models.push(e);
            }
            header.n_items = group.len() as u32;
            let meta = self.meta_buffer(&header, &models);
            let bytes = self.accumulate(
                job,
                st,
                (Shader::Select, "histogram"),
                &meta,
                group.len() as u64 * 65536 * 4,
                None,
                |_, st, t| Ok((None, Self::quad_grid(st, t))),
            )?;
            let words = words(&bytes);
            for q in 0..group.len() {
                out.push(
                    words[q * 65536..(q + 1) * 65536]
                        .iter()
                        .map(|&c| c as u64)
                        .collect(),
                );
            }
        }
        Ok(out)
    }

    fn nth_equal(&self, job: &Job, src: Source, t: u32, q: u64) -> Result<u32> {
        let mut guard = self.state(job)?;
        let st = guard.as_mut().unwrap();
        let mut models = self.models_meta(job, st);
        let mut header = self.header(job, st, 0);
        let mut e = match src {
            Source::Delta(i) => ModelMeta {
                aux: 0,
                ..models[i]
            },
            Source::Model(i) => ModelMeta {
                aux: 1,
                ..models[i]
            },
            Source::Variance => ModelMeta {
                aux: 4,
                ..Default::default()
            },
        };
        e.hi_bits = t;
        models.push(e);
        header.n_items = 1;
        let meta = self.meta_buffer(&header, &models);
        let bytes = self.accumulate(
            job,
            st,
            (Shader::Select, "count_equal"),
            &meta,
            st.total_groups as u64 * 4,
            None,
            |_, st, t| Ok((None, Self::quad_grid(st, t))),
        )?;
        let counts = words(&bytes);
        let mut before = 0u64;
        let mut found = None;
        for (w, &c) in counts.iter().enumerate() {
            if before + c as u64 > q {
                found = Some((w as u32, q - before));
                break;
            }
            before += c as u64;
        }
        let (w, rem) = found.ok_or_else(|| {
            Error::Gpu(format!(
                "{}: tie count disagrees with the histogram",
                job.name
            ))
        })?;
        let ti = st
            .tiles
            .iter()
            .position(|s| w >= s.wg_base && w < s.wg_base + s.groups())
            .expect("workgroup inside a tile");
        let spec = st.tiles[ti];
        header.focus = w - spec.wg_base;
        let meta = self.meta_buffer(&header, &models);
        let bytes = self.accumulate(
            job,
            st,
            (Shader::Select, "equal_bits"),
            &meta,
            32 * 4,
            Some(ti),
            |_, st, t| Ok((None, Self::quad_grid(st, t))),
        )?;
        let mask = words(&bytes);
        let j = (0..WG_ELEMS)
            .filter(|j| mask[j / 32] >> (j % 32) & 1 == 1)
            .nth(rem as usize)
            .ok_or_else(|| {
                Error::Gpu(format!("{}: tie mask disagrees with the counts", job.name))
            })?;
        Ok((spec.start + header.focus as usize * WG_ELEMS + j) as u32)
    }

    // always all three sums (one shader for both uses)
    fn weighted_sum(
        &self,
        job: &Job,
        weights: &[f32],
        divisor: Option<f32>,
        out: &mut [u8],
    ) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        self.apply_weighted(job, "weighted_sum", weights, out, |h| {
            if let Some(d) = divisor {
                h.has_divisor = 1;
                h.divisor = d;
            }
        })
    }

    fn convert(&self, job: &Job, out: &mut [u8]) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        let (header, models) = {
            let mut guard = self.state(job)?;
            let st = guard.as_mut().unwrap();
            (self.header(job, st, 0), self.models_meta(job, st))
        };
        self.apply(
            job,
            (Shader::Convert, "convert"),
            header,
            models,
            None,
            None,
            out,
        )
    }

    fn dots(
        &self,
        job: &Job,
        vecs: &[Vector],
        pairs: &[(usize, usize)],
        seg: Segments,
    ) -> Result<Vec<f64>> {
        let n = job.numel;
        let np = pairs.len();
        let nseg = seg.count(n);
        if n == 0 || np == 0 {
            return Ok(vec![0.0; nseg * np]);
        }
        let mut guard = self.state(job)?;
        let st = guard.as_mut().unwrap();
        let need = seg.align();
        if st.tiles.len() > 1 && st.tile_elems % need != 0 {
            return Err(Error::Gpu(format!(
                "{}: per-{seg:?} sums need tiles of whole multiples of {need} elements; create the job with that alignment",
                job.name
            )));
        }
        let mut h = self.header(job, st, 0);
        Self::segment_header(&mut h, seg);
        h.n_items = vecs.len() as u32;
        h.n_pairs = np as u32;
        let meta = self.meta_buffer(&h, &self.vector_meta(job, st, vecs));
        let pair_words: Vec<u32> = pairs
            .iter()
            .flat_map(|&(a, b)| [a as u32, b as u32])
            .collect();
        let aux = self.storage_init("pairs", &pair_words);
        let max_dim = self.max_dim();
        let (entry, slots) = match seg {
            // two words (compensated high and low parts) per partial
            Segments::Whole => ("dots_whole", 2 * st.total_groups as usize),
            Segments::Rows { .. } => ("dots_rows", nseg),
            Segments::Cols { cols } => ("dots_cols", (n / cols).div_ceil(256) * cols),
        };
        let bytes = self.accumulate(
            job,
            st,
            (Shader::Reduce, entry),
            &meta,
            (slots * np * 4) as u64,
            None,
            |_, st, t| {
                let s = st.tiles[t];
                let groups = match seg {
                    Segments::Whole => (s.groups_x, s.groups_y),
                    Segments::Rows { len } => grid(s.len.div_ceil(len), max_dim),
                    Segments::Cols { cols } => {
                        grid(cols.div_ceil(16) * (s.len / cols).div_ceil(256), max_dim)
                    }
                };
                Ok((Some(aux.clone()), groups))
            },
        )?;
        let parts = floats(&bytes);
        let mut out = vec![0.0f64; nseg * np];
        match seg {
            Segments::Whole => {
                for group in parts.chunks_exact(2 * np) {
                    for (o, hl) in out.iter_mut().zip(group.chunks_exact(2)) {
                        *o += hl[0] as f64 + hl[1] as f64;
                    }
                }
            }
            Segments::Rows { .. } => {
                for (o, v) in out.iter_mut().zip(parts) {
                    *o = v as f64;
                }
            }
            Segments::Cols { cols } => {
                for h in 0..(n / cols).div_ceil(256) {
                    for c in 0..cols {
                        for p in 0..np {
                            out[c * np + p] += parts[(h * cols + c) * np + p] as f64;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn combine(
        &self,
        job: &Job,
        terms: &[Vector],
        seg: Segments,
        coefs: &[f32],
        out: &mut [u8],
    ) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        let (header, models) = {
            let mut guard = self.state(job)?;
            let st = guard.as_mut().unwrap();
            let mut h = self.header(job, st, 0);
            Self::segment_header(&mut h, seg);
            h.n_items = terms.len() as u32;
            (h, self.vector_meta(job, st, terms))
        };
        let words: Vec<u32> = coefs.iter().map(|c| c.to_bits()).collect();
        let aux = self.storage_init("coefficients", &words);
        self.apply(
            job,
            (Shader::Reduce, "combine"),
            header,
            models,
            Some(&aux),
            None,
            out,
        )
    }

    fn matmul(&self, a: &Mat, b: &Mat, ta: bool, tb: bool) -> Result<Mat> {
        let _t = crate::backend::linalg_time::matmul();
        self.gpu_matmul(a, b, ta, tb)
    }

    /// Randomised range finder (Halko, Martinsson & Tropp 2011) with the products on the GPU:
    /// Y = A·Ω for a Gaussian-like Ω of rank + 10 columns, two power iterations, then the
    /// small dense SVD of Qᵀ·A on the host. Small or nearly full-rank problems go straight
    /// to the dense SVD.
    fn svd(&self, a: &Mat, rank: Option<usize>) -> Result<Svd> {
        let _t = crate::backend::linalg_time::svd();
        let full = a.rows.min(a.cols);
        let k = rank.unwrap_or(full).min(full);
        let l = (k + 10).min(full);
        if full <= 64 || 2 * l >= full {
            return crate::linalg::svd(a, Some(k));
        }
        let stream = crate::rng::Stream::new(0x5eed_5eed, "svd", 0);
        let omega = Mat::from_fn(a.cols, l, |i, j| {
            stream.uniform_at((i * l + j) as u64) - 0.5
        });
        let mut q = crate::linalg::orthonormal_basis(&self.gpu_matmul(a, &omega, false, false)?);
        for _ in 0..2 {
            let z = crate::linalg::orthonormal_basis(&self.gpu_matmul(a, &q, true, false)?);
            q = crate::linalg::orthonormal_basis(&self.gpu_matmul(a, &z, false, false)?);
        }
        let small = self.gpu_matmul(&q, a, true, false)?;
        let d = crate::linalg::svd(&small, Some(k))?;
        Ok(Svd {
            u: crate::linalg::matmul(&q, &d.u, false, false)?,
            s: d.s,
            vt: d.vt,
        })
    }

    fn end_job(&self, job: &Job) {
        let mut g = self.state.lock().unwrap();
        if g.as_ref().map(|s| s.id) == Some(job.id) {
            *g = None;
        }
    }
}

impl Fused for Gpu {
    fn masked_sums(&self, job: &Job, sp: &Sparsity, _squares: bool) -> Result<Vec<[f64; 3]>> {
        let m = job.models.len();
        if job.numel == 0 || m == 0 {
            return Ok(vec![[0.0; 3]; m]);
        }
        let mut guard = self.state(job)?;
        let st = guard.as_mut().unwrap();
        let mut header = self.header(job, st, sp.seed);
        header.use_var = sp.ranks_by_variance() as u32;
        let mut models = self.models_meta(job, st);
        let della = self.sparsity_meta(st, sp, &mut models);
        let meta = self.meta_buffer(&header, &models);
        let bytes = self.accumulate(
            job,
            st,
            (Shader::Gta, "masked_sums"),
            &meta,
            st.total_groups as u64 * m as u64 * 12,
            None,
            |me, st, t| {
                if let Some(d) = &della {
                    me.della_ranks(job, st, t, d)?;
                }
                Ok((
                    della.as_ref().map(|d| d.aux.clone()),
                    Self::quad_grid(st, t),
                ))
            },
        )?;
        let parts = floats(&bytes);
        let mut out = vec![[0.0f64; 3]; m];
        for w in 0..st.total_groups as usize {
            for (i, o) in out.iter_mut().enumerate() {
                for (j, v) in o.iter_mut().enumerate() {
                    *v += parts[(w * m + i) * 3 + j] as f64;
                }
            }
        }
        Ok(out)
    }

    fn gta(&self, job: &Job, spec: &GtaSpec, out: &mut [u8]) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        let (header, models, della) = {
            let mut guard = self.state(job)?;
            let st = guard.as_mut().unwrap();
            let sp = &spec.sparsity;
            let mut h = self.header(job, st, sp.seed);
            let mut wsum = 0.0f32;
            spec.weights.iter().for_each(|w| wsum += *w);
            h.wsum = if wsum.abs() < 1e-8 { 1.0 } else { wsum };
            h.consensus = match spec.consensus {
                Consensus::None => 0,
                Consensus::Sum => 1,
                Consensus::Count => 2,
            };
            h.vote = (spec.vote == Vote::Unweighted) as u32;
            h.normalize = spec.normalize as u32;
            h.lambda = spec.lambda;
            if let Some(f) = spec.div_floor {
                h.floor_on = 1;
                h.div_floor = f;
            }
            h.use_var = sp.ranks_by_variance() as u32;
            let mut models = self.models_meta(job, st);
            let della = self.sparsity_meta(st, sp, &mut models);
            for (i, mm) in models.iter_mut().enumerate() {
                mm.weight = spec.weights[i];
                mm.scale = spec.scale[i];
            }
            (h, models, della)
        };
        self.apply(
            job,
            (Shader::Gta, "gta"),
            header,
            models,
            None,
            della.as_ref(),
            out,
        )
    }

    fn fisher(&self, job: &Job, coefs: &[f32], floor: f32, out: &mut [u8]) -> Result<()> {
        assert_eq!(
            job.models.len(),
            2 * coefs.len(),
            "fisher: a Fisher input per model"
        );
        if job.numel == 0 {
            return Ok(());
        }
        self.apply_weighted(job, "fisher", coefs, out, |h| {
            h.n_items = coefs.len() as u32;
            h.t = floor;
        })
    }

    fn pcb(&self, job: &Job, spec: &PcbSpec, beta_of: Option<usize>, out: &mut [u8]) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        let (header, models) = {
            let mut guard = self.state(job)?;
            let st = guard.as_mut().unwrap();
            let mut h = self.header(job, st, 0);
            if let Some(i) = beta_of {
                h.n_items = 1;
                h.focus = i as u32;
            }
            let mut models = self.models_meta(job, st);
            for (i, m) in models.iter_mut().enumerate() {
                m.lo_bits = spec.lo[i].to_bits();
                m.hi_bits = spec.hi[i].to_bits();
                m.lo_index = spec.q[i].to_bits();
                m.hi_index = spec.bmax[i].to_bits();
                m.weight = spec.weights[i];
            }
            (h, models)
        };
        self.apply(job, (Shader::Gta, "pcb"), header, models, None, None, out)
    }

    fn ternary(&self, job: &Job, threshold: u32, out: &mut [u8]) -> Result<()> {
        self.apply_with_t(job, "ternary", f32::from_bits(threshold), out)
    }

    fn nearswap(&self, job: &Job, t: f32, out: &mut [u8]) -> Result<()> {
        self.apply_with_t(job, "nearswap", t, out)
    }
}
