//! The GPU backend on wgpu: the same primitives as the CPU, as WGSL compute kernels.
//!
//! A job's inputs travel in tiles of whole quads (4 elements), each tile one storage buffer
//! holding every input's raw bytes (only input-dtype bytes go up). Tiles are sized from the
//! adapter's binding limit (or a test override). When all of a job's tiles fit in the VRAM
//! budget they are uploaded once and stay resident across the job's passes (selection
//! histograms, norms, the combine); otherwise two tile slots stream, with the upload of the
//! next tile and the readback of the previous one overlapping the current one's kernels.

pub mod context;
pub mod shaders;

use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use super::cpu::select_with;
use super::{Backend, Consensus, GtaSpec, Input, Job, Keep, Query, RankCut, Source};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rng::fnv1a32;
pub use context::{list_adapters, AdapterDesc, GpuContext};
use shaders::Shader;

/// Elements per workgroup: 256 invocations × one quad each.
const WG_ELEMS: usize = 1024;

#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Adapter index (from `smelt devices`) or part of its name.
    pub adapter: Option<String>,
    /// Bytes of input tiles a job may keep resident; larger jobs stream. Default 2 GiB.
    pub vram_budget: Option<u64>,
    /// Largest tile in elements (tests use small tiles to force streaming).
    pub tile_elems: Option<usize>,
}

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
    _pad: u32,
}

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
    p: f32,
    weight: f32,
    scale: f32,
    aux: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct TileUbo {
    n: u32,
    start: u32,
    groups_x: u32,
    wg_base: u32,
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

pub struct Gpu {
    pub ctx: Arc<GpuContext>,
    tile_cap: usize,
    budget: u64,
    state: Mutex<Option<JobState>>,
}

fn code(d: DType) -> u32 {
    d.code()
}

fn align4(x: usize) -> usize {
    x.div_ceil(4) * 4
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
            tile_cap: opts.tile_elems.unwrap_or(usize::MAX).max(WG_ELEMS),
            budget: opts.vram_budget.unwrap_or(2 << 30),
            state: Mutex::new(None),
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

    fn plan_job(&self, job: &Job) -> Result<JobState> {
        let inputs = Self::inputs(job);
        let per_elem: usize = inputs.iter().map(|i| i.dtype.size()).sum::<usize>().max(1);
        let limit = self.ctx.limits.max_storage_buffer_binding_size as usize;
        let buf_limit = self.ctx.limits.max_buffer_size as usize;
        // A tile's src (all inputs), its f32 output and its partial sums must each fit a binding.
        let n = job.numel;
        let mut tile = (limit.min(buf_limit) / per_elem.max(4)).min(self.tile_cap);
        // no larger than the job itself
        tile = tile.min(n.div_ceil(WG_ELEMS) * WG_ELEMS);
        tile = (tile / WG_ELEMS).max(1) * WG_ELEMS;
        let mut seg_off = Vec::with_capacity(inputs.len());
        let mut words = 0u32;
        for i in &inputs {
            seg_off.push(words);
            words += (align4(tile * i.dtype.size()) / 4).div_ceil(4) as u32 * 4;
        }
        let max_dim = self.ctx.limits.max_compute_workgroups_per_dimension.max(1);
        let mut tiles = Vec::new();
        let mut wg_base = 0u32;
        let mut start = 0;
        while start < n {
            let len = tile.min(n - start);
            let groups = len.div_ceil(WG_ELEMS) as u32;
            let groups_x = groups.min(max_dim);
            let groups_y = groups.div_ceil(groups_x);
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
            *g = Some(self.plan_job(job)?);
        }
        Ok(g)
    }

    /// The buffers holding tile `t`, uploading it if they do not already.
    fn tile_gpu<'s>(&self, st: &'s mut JobState, job: &Job, t: usize) -> Result<&'s TileGpu> {
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
                groups_x: spec.groups_x,
                wg_base: spec.wg_base,
            };
            self.ctx
                .queue
                .write_buffer(&tg.ubo, 0, bytemuck::bytes_of(&ubo));
            st.holds[slot] = Some(t);
        }
        Ok(&st.bufs[slot])
    }

    fn header(&self, job: &Job, st: &JobState, seed: u64) -> MetaHeader {
        let m = job.models.len();
        MetaHeader {
            n_models: m as u32,
            base_offset: if job.base.is_some() { st.seg_off[m] } else { 0 },
            base_dtype: job.base.map(|b| code(b.dtype)).unwrap_or(0),
            load_dtype: code(job.load_dtype),
            out_dtype: code(job.out_dtype),
            lambda: 1.0,
            wsum: 1.0,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            name_hash: fnv1a32(job.name),
            ..Default::default()
        }
    }

    fn model_meta(&self, job: &Job, st: &JobState, i: usize) -> ModelMeta {
        ModelMeta {
            offset: st.seg_off[i],
            dtype: code(job.models[i].dtype),
            rng_model: i as u32,
            weight: 1.0,
            scale: 1.0,
            ..Default::default()
        }
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

    fn storage(&self, label: &str, bytes: u64, copy_src: bool) -> wgpu::Buffer {
        let mut usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        if copy_src {
            usage |= wgpu::BufferUsages::COPY_SRC;
        }
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16),
            usage,
            mapped_at_creation: false,
        })
    }

    fn readback(&self, bytes: u64) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.max(16),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    fn encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        pipe: &wgpu::ComputePipeline,
        tg: &TileGpu,
        meta: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        spec: &TileSpec,
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
                        resource: tg.src.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: meta.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: dst.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 3,
                        resource: tg.ubo.as_entire_binding(),
                    },
                ],
            });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(pipe);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(spec.groups_x, spec.groups_y, 1);
    }

    /// Maps `buf[..bytes]` after all submitted work and hands the bytes to `f`.
    fn read<R>(&self, buf: &wgpu::Buffer, bytes: u64, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let (tx, rx) = mpsc::channel();
        buf.slice(..bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.ctx.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("readback was abandoned".into()))?
            .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
        let r = {
            let view = buf
                .slice(..bytes)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
            f(&view)
        };
        buf.unmap();
        Ok(r)
    }

    /// Runs a kernel that accumulates into `dst` over every tile, then reads `bytes` of it.
    fn accumulate(
        &self,
        job: &Job,
        st: &mut JobState,
        (shader, entry): (Shader, &'static str),
        meta: &wgpu::Buffer,
        dst_bytes: u64,
        only_tile: Option<usize>,
    ) -> Result<Vec<u8>> {
        let pipe = self.ctx.pipeline(shader, entry)?;
        let dst = self.storage("accumulator", dst_bytes, true);
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&dst, 0, None);
        self.ctx.queue.submit([enc.finish()]);
        for t in 0..st.tiles.len() {
            if only_tile.is_some_and(|o| o != t) {
                continue;
            }
            let spec = st.tiles[t];
            let tg = self.tile_gpu(st, job, t)?;
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.encode(&mut enc, &pipe, tg, meta, &dst, &spec);
            self.ctx.queue.submit([enc.finish()]);
        }
        let rb = self.readback(dst_bytes);
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&dst, 0, &rb, 0, dst_bytes.max(16));
        self.ctx.queue.submit([enc.finish()]);
        self.read(&rb, dst_bytes.max(16), |b| b[..dst_bytes as usize].to_vec())
    }

    /// Runs an output-writing kernel over every tile into `out`, overlapping the readback
    /// of each tile with the next tile's upload and kernels.
    fn apply(
        &self,
        job: &Job,
        shader: Shader,
        entry: &'static str,
        header: MetaHeader,
        models: Vec<ModelMeta>,
        out: &mut [u8],
    ) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        let mut guard = self.state(job)?;
        let st = guard.as_mut().unwrap();
        let pipe = self.ctx.pipeline(shader, entry)?;
        let meta = self.meta_buffer(&header, &models);
        let osz = job.out_dtype.size();
        let tile_out = align4(st.tile_elems * osz) as u64;
        let outs = [
            self.storage("tile out", tile_out, true),
            self.storage("tile out", tile_out, true),
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
                    .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
                out[spec.start * osz..(spec.start + spec.len) * osz]
                    .copy_from_slice(&view[..spec.len * osz]);
            }
            rbs[slot].unmap();
            Ok(())
        };
        for t in 0..st.tiles.len() {
            let slot = t % 2;
            let spec = st.tiles[t];
            let tg = self.tile_gpu(st, job, t)?;
            let bytes = align4(spec.len * osz) as u64;
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.encode(&mut enc, &pipe, tg, &meta, &outs[slot], &spec);
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

    fn keep_meta(m: &mut ModelMeta, k: &Keep) {
        match *k {
            Keep::All => m.keep = 0,
            Keep::Nothing => m.keep = 1,
            Keep::Ranks { lo, hi } => {
                m.keep = 2;
                m.lo_bits = lo.bits;
                m.lo_index = lo.index;
                m.hi_bits = hi.bits;
                m.hi_index = hi.index;
            }
            Keep::Random { p } => {
                m.keep = 3;
                m.p = p;
            }
        }
    }

    fn source_meta(&self, job: &Job, st: &JobState, src: Source) -> ModelMeta {
        let (i, aux) = match src {
            Source::Delta(i) => (i, 0),
            Source::Model(i) => (i, 1),
        };
        ModelMeta {
            aux,
            ..self.model_meta(job, st, i)
        }
    }

    fn histograms(&self, job: &Job, sources: &[(Source, Option<u32>)]) -> Result<Vec<Vec<u64>>> {
        let mut guard = self.state(job)?;
        let st = guard.as_mut().unwrap();
        let mut out = Vec::with_capacity(sources.len());
        // At most 64 sources per pass keeps the histogram buffer at 16 MiB.
        for group in sources.chunks(64) {
            let models: Vec<ModelMeta> = group
                .iter()
                .map(|(s, filter)| {
                    let mut m = self.source_meta(job, st, *s);
                    if let Some(hb) = filter {
                        m.aux |= 2;
                        m.lo_bits = *hb;
                    }
                    m
                })
                .collect();
            let mut header = self.header(job, st, 0);
            header.n_models = models.len() as u32;
            let meta = self.meta_buffer(&header, &models);
            let bytes = self.accumulate(
                job,
                st,
                (Shader::Select, "histogram"),
                &meta,
                group.len() as u64 * 65536 * 4,
                None,
            )?;
            let words: &[u32] = bytemuck::cast_slice(&bytes);
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
        let mut sm = self.source_meta(job, st, src);
        sm.hi_bits = t;
        let mut header = self.header(job, st, 0);
        header.n_models = 1;
        let meta = self.meta_buffer(&header, &[sm]);
        let bytes = self.accumulate(
            job,
            st,
            (Shader::Select, "count_equal"),
            &meta,
            st.total_groups as u64 * 4,
            None,
        )?;
        let counts: &[u32] = bytemuck::cast_slice(&bytes);
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
        let meta = self.meta_buffer(&header, &[sm]);
        let bytes = self.accumulate(
            job,
            st,
            (Shader::Select, "equal_bits"),
            &meta,
            32 * 4,
            Some(ti),
        )?;
        let mask: &[u32] = bytemuck::cast_slice(&bytes);
        let mut seen = 0u64;
        for j in 0..WG_ELEMS {
            if mask[j / 32] >> (j % 32) & 1 == 1 {
                if seen == rem {
                    return Ok((spec.start + header.focus as usize * WG_ELEMS + j) as u32);
                }
                seen += 1;
            }
        }
        Err(Error::Gpu(format!(
            "{}: tie mask disagrees with the counts",
            job.name
        )))
    }
}

impl Backend for Gpu {
    fn name(&self) -> String {
        format!("gpu: {} ({})", self.ctx.info.name, self.ctx.info.backend)
    }

    fn select(&self, job: &Job, queries: &[Query]) -> Result<Vec<RankCut>> {
        select_with(
            job,
            queries,
            |j, s| self.histograms(j, s),
            |j, s, t, q| self.nth_equal(j, s, t, q),
        )
    }

    fn masked_l1(&self, job: &Job, keep: &[Keep], seed: u64) -> Result<Vec<[f64; 2]>> {
        let m = job.models.len();
        if job.numel == 0 || m == 0 {
            return Ok(vec![[0.0; 2]; m]);
        }
        let mut guard = self.state(job)?;
        let st = guard.as_mut().unwrap();
        let header = self.header(job, st, seed);
        let models: Vec<ModelMeta> = (0..m)
            .map(|i| {
                let mut mm = self.model_meta(job, st, i);
                Self::keep_meta(&mut mm, &keep[i]);
                mm
            })
            .collect();
        let meta = self.meta_buffer(&header, &models);
        let bytes = self.accumulate(
            job,
            st,
            (Shader::Gta, "masked_l1"),
            &meta,
            st.total_groups as u64 * m as u64 * 8,
            None,
        )?;
        let parts: &[f32] = bytemuck::cast_slice(&bytes);
        let mut out = vec![[0.0f64; 2]; m];
        for w in 0..st.total_groups as usize {
            for (i, o) in out.iter_mut().enumerate() {
                o[0] += parts[(w * m + i) * 2] as f64;
                o[1] += parts[(w * m + i) * 2 + 1] as f64;
            }
        }
        Ok(out)
    }

    fn gta(&self, job: &Job, spec: &GtaSpec, out: &mut [u8]) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        let (header, models) = {
            let mut guard = self.state(job)?;
            let st = guard.as_mut().unwrap();
            let mut h = self.header(job, st, spec.seed);
            let mut wsum = 0.0f32;
            spec.weights.iter().for_each(|w| wsum += *w);
            h.wsum = if wsum.abs() < 1e-8 { 1.0 } else { wsum };
            h.consensus = match spec.consensus {
                Consensus::None => 0,
                Consensus::Sum => 1,
                Consensus::Count => 2,
            };
            h.normalize = spec.normalize as u32;
            h.lambda = spec.lambda;
            let models: Vec<ModelMeta> = (0..job.models.len())
                .map(|i| {
                    let mut mm = self.model_meta(job, st, i);
                    Self::keep_meta(&mut mm, &spec.keep[i]);
                    mm.weight = spec.weights[i];
                    mm.scale = spec.scale[i];
                    mm
                })
                .collect();
            (h, models)
        };
        self.apply(job, Shader::Gta, "gta", header, models, out)
    }

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
        let (header, models) = {
            let mut guard = self.state(job)?;
            let st = guard.as_mut().unwrap();
            let mut h = self.header(job, st, 0);
            if let Some(d) = divisor {
                h.has_divisor = 1;
                h.divisor = d;
            }
            let models: Vec<ModelMeta> = (0..job.models.len())
                .map(|i| ModelMeta {
                    weight: weights[i],
                    ..self.model_meta(job, st, i)
                })
                .collect();
            (h, models)
        };
        self.apply(job, Shader::Gta, "weighted_sum", header, models, out)
    }

    fn convert(&self, job: &Job, out: &mut [u8]) -> Result<()> {
        if job.numel == 0 {
            return Ok(());
        }
        let (header, models) = {
            let mut guard = self.state(job)?;
            let st = guard.as_mut().unwrap();
            (self.header(job, st, 0), vec![self.model_meta(job, st, 0)])
        };
        self.apply(job, Shader::Convert, "convert", header, models, out)
    }

    fn end_job(&self, job: &Job) {
        let mut g = self.state.lock().unwrap();
        if g.as_ref().map(|s| s.id) == Some(job.id) {
            *g = None;
        }
    }
}
