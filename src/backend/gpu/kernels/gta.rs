//! The task-arithmetic family (task arithmetic, TIES, DARE, Breadcrumbs, DELLA, SCE): the
//! GTA combine ([`GtaSpec`]) and the masked sums its rescaling and SCE's weights need. Both
//! apply the same keep rules ([`Sparsity`]), set per model in its metadata entry; DELLA's
//! rules also need each element's rank within its row, sorted per tile by [`super::rank`].

use super::{rank, Shader, COMMON, RNG, STORE};
use crate::backend::gpu::dispatch::Launch;
use crate::backend::gpu::{floats, Gpu};
use crate::backend::{keep_threshold, Consensus, GtaSpec, Job, Keep, Key, Sparsity, Vote};
use crate::error::Result;

pub const SHADER: Shader = Shader {
    name: "gta.wgsl",
    preludes: &[COMMON, RNG, STORE],
    body: include_str!("gta.wgsl"),
    entries: &["gta", "masked_sums"],
    stepped: &[],
};

/// Sets each model's keep rule, and for DELLA binds its tables and has the ranks of each
/// tile sorted before the kernel runs.
fn sparsity<'g, 'j>(mut k: Launch<'g, 'j>, sp: &Sparsity) -> Launch<'g, 'j> {
    k.header.use_var = sp.ranks_by_variance() as u32;
    let tile_elems = k.st().tile_elems;
    let mut della = Vec::new();
    let mut words: Vec<u32> = Vec::new();
    let mut table_off = Vec::new();
    for t in &sp.tables {
        table_off.push(words.len() as u32);
        words.extend_from_slice(t);
    }
    let ranks_start = words.len() as u32;
    for (i, (m, keep)) in k.models.iter_mut().zip(&sp.keep).enumerate() {
        match *keep {
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
                m.thr = keep_threshold(p);
            }
            Keep::Della { rows, table } => {
                m.keep = 5;
                m.table = table_off[table];
                m.ranks = ranks_start + (della.len() * tile_elems) as u32;
                della.push(rank::RowSort {
                    model: i,
                    rows,
                    out_offset: m.ranks,
                });
            }
        }
    }
    if della.is_empty() {
        return k;
    }
    let total = ranks_start as usize + della.len() * tile_elems;
    words.resize(total, 0);
    let aux = k.gpu().storage_init("della tables and ranks", &words);
    let ranks = aux.clone();
    k.aux(aux)
        .before_each_tile(move |gpu, job, st, t| rank::sort_rows(gpu, job, st, t, &della, &ranks))
}

// always all three sums (one shader for both uses)
pub fn masked_sums(gpu: &Gpu, job: &Job, sp: &Sparsity, _squares: bool) -> Result<Vec<[f64; 3]>> {
    let m = job.models.len();
    if job.numel == 0 || m == 0 {
        return Ok(vec![[0.0; 3]; m]);
    }
    let mut k = sparsity(gpu.launch(job, sp.seed)?, sp);
    let groups = k.st().total_groups as usize;
    let bytes = k.accumulate(&SHADER, "masked_sums", groups as u64 * m as u64 * 12, |s| {
        s.quad_grid()
    })?;
    let parts = floats(&bytes);
    let mut out = vec![[0.0f64; 3]; m];
    for w in 0..groups {
        for (i, o) in out.iter_mut().enumerate() {
            for (j, v) in o.iter_mut().enumerate() {
                *v += parts[(w * m + i) * 3 + j] as f64;
            }
        }
    }
    Ok(out)
}

pub fn gta(gpu: &Gpu, job: &Job, spec: &GtaSpec, out: &mut [u8]) -> Result<()> {
    if job.numel == 0 {
        return Ok(());
    }
    let sp = &spec.sparsity;
    let mut k = gpu.launch(job, sp.seed)?;
    let h = &mut k.header;
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
    let mut k = sparsity(k, sp);
    for (i, mm) in k.models.iter_mut().enumerate() {
        mm.weight = spec.weights[i];
        mm.scale = spec.scale[i];
    }
    k.write(&SHADER, "gta", out)
}
