//! The GPU backend on wgpu: the same primitives as the CPU, as WGSL compute kernels.
//!
//! A job's inputs travel in tiles of whole quads (4 elements), each tile one storage buffer
//! holding every input's raw bytes (only input-dtype bytes go up). Tiles are sized from the
//! adapter's binding limit (or a test override) and hold whole rows when a method ranks
//! within rows. When all of a job's tiles fit in the VRAM budget they are uploaded once and
//! stay resident across the job's passes (selection histograms, norms, the combine);
//! otherwise two tile slots stream, with the upload of the next tile and the readback of the
//! previous one overlapping the current one's kernels.
//!
//! Layout: this file keeps the tiling and the job state in hand and implements the traits,
//! each method one call into its kernel family under [`kernels`] (host code beside its
//! WGSL); [`dispatch`] binds and launches kernels over a job's tiles; [`meta`] holds the
//! host copies of the structs the kernels read; [`context`] the device and pipeline cache.

pub mod context;
mod dispatch;
mod kernels;
mod meta;

use std::sync::{Arc, Mutex, MutexGuard};

use super::{Backend, Fused, GtaSpec, Input, Job, PcbSpec, Segments, Source, Sparsity, Vector};
use crate::error::{Error, Result};
use crate::linalg::{Mat, Svd};
pub use context::{list_adapters, AdapterDesc, GpuContext};
use meta::TileUbo;

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

    /// The grid of an elementwise kernel over this tile: one invocation per quad.
    fn quad_grid(&self) -> (u32, u32) {
        (self.groups_x, self.groups_y)
    }
}

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
                ..Default::default()
            };
            self.ctx
                .queue
                .write_buffer(&tg.ubo, 0, bytemuck::bytes_of(&ubo));
            st.holds[slot] = Some(t);
        }
        &st.bufs[slot]
    }
}

/// The generic primitives, each in its kernel family.
impl Backend for Gpu {
    fn name(&self) -> String {
        format!("gpu: {} ({})", self.ctx.info.name, self.ctx.info.backend)
    }

    fn histogram(&self, job: &Job, sources: &[(Source, Option<u32>)]) -> Result<Vec<Vec<u64>>> {
        kernels::select::histogram(self, job, sources)
    }

    fn nth_equal(&self, job: &Job, src: Source, bits: u32, q: u64) -> Result<u32> {
        kernels::select::nth_equal(self, job, src, bits, q)
    }

    fn convert(&self, job: &Job, out: &mut [u8]) -> Result<()> {
        kernels::convert::convert(self, job, out)
    }

    fn weighted_sum(
        &self,
        job: &Job,
        weights: &[f32],
        divisor: Option<f32>,
        out: &mut [u8],
    ) -> Result<()> {
        kernels::weighted_sum::weighted_sum(self, job, weights, divisor, out)
    }

    fn dots(
        &self,
        job: &Job,
        vecs: &[Vector],
        pairs: &[(usize, usize)],
        seg: Segments,
    ) -> Result<Vec<f64>> {
        kernels::reduce::dots(self, job, vecs, pairs, seg)
    }

    fn combine(
        &self,
        job: &Job,
        terms: &[Vector],
        seg: Segments,
        coefs: &[f32],
        out: &mut [u8],
    ) -> Result<()> {
        kernels::reduce::combine(self, job, terms, seg, coefs, out)
    }

    fn matmul(&self, a: &Mat, b: &Mat, ta: bool, tb: bool) -> Result<Mat> {
        let _t = crate::backend::linalg_time::matmul();
        kernels::matmul::matmul(self, a, b, ta, tb)
    }

    fn svd(&self, a: &Mat, rank: Option<usize>) -> Result<Svd> {
        let _t = crate::backend::linalg_time::svd();
        kernels::matmul::svd(self, a, rank)
    }

    fn end_job(&self, job: &Job) {
        let mut g = self.state.lock().unwrap();
        if g.as_ref().map(|s| s.id) == Some(job.id) {
            *g = None;
        }
    }
}

/// The fused per-method kernels, each in its own family.
impl Fused for Gpu {
    fn masked_sums(&self, job: &Job, sp: &Sparsity, squares: bool) -> Result<Vec<[f64; 3]>> {
        kernels::gta::masked_sums(self, job, sp, squares)
    }

    fn gta(&self, job: &Job, spec: &GtaSpec, out: &mut [u8]) -> Result<()> {
        kernels::gta::gta(self, job, spec, out)
    }

    fn nearswap(&self, job: &Job, t: f32, out: &mut [u8]) -> Result<()> {
        kernels::nearswap::nearswap(self, job, t, out)
    }

    fn fisher(&self, job: &Job, coefs: &[f32], floor: f32, out: &mut [u8]) -> Result<()> {
        kernels::fisher::fisher(self, job, coefs, floor, out)
    }

    fn pcb(&self, job: &Job, spec: &PcbSpec, beta_of: Option<usize>, out: &mut [u8]) -> Result<()> {
        kernels::pcb::pcb(self, job, spec, beta_of, out)
    }

    fn ternary(&self, job: &Job, threshold: u32, out: &mut [u8]) -> Result<()> {
        kernels::ternary::ternary(self, job, threshold, out)
    }
}
