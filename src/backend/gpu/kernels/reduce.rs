//! Per-vector statistics and combines (Model Stock, the SLERP family, Karcher, …): dot
//! products of vectors formed from the inputs, per segment, and coefficient-weighted sums
//! of them. Vectors are metadata entries after the models' (see `reduce.wgsl`).

use super::{Shader, COMMON, STORE};
use crate::backend::gpu::meta::{MetaHeader, ModelMeta};
use crate::backend::gpu::{floats, grid, Gpu};
use crate::backend::{Job, Segments, Vector};
use crate::error::{Error, Result};

pub const SHADER: Shader = Shader {
    name: "reduce.wgsl",
    preludes: &[COMMON, STORE],
    body: include_str!("reduce.wgsl"),
    entries: &["dots_whole", "dots_rows", "dots_cols", "combine"],
    stepped: &[],
};

/// Vector entries, appended after the models' entries.
fn push_vectors(models: &mut Vec<ModelMeta>, vecs: &[Vector]) {
    for v in vecs {
        let (aux, model) = match *v {
            Vector::Model(i) => (0, i),
            Vector::Base => (1, 0),
            Vector::Delta(i) => (2, i),
            Vector::Ones => (3, 0),
        };
        models.push(ModelMeta {
            aux,
            rng_model: model as u32,
            ..Default::default()
        });
    }
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

pub fn dots(
    gpu: &Gpu,
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
    let k = gpu.launch(job, 0)?;
    let need = seg.align();
    if k.st().tiles.len() > 1 && k.st().tile_elems % need != 0 {
        return Err(Error::Gpu(format!(
            "{}: per-{seg:?} sums need tiles of whole multiples of {need} elements; create the job with that alignment",
            job.name
        )));
    }
    let pair_words: Vec<u32> = pairs
        .iter()
        .flat_map(|&(a, b)| [a as u32, b as u32])
        .collect();
    let mut k = k.aux(gpu.storage_init("pairs", &pair_words));
    segment_header(&mut k.header, seg);
    k.header.n_items = vecs.len() as u32;
    k.header.n_pairs = np as u32;
    push_vectors(&mut k.models, vecs);
    let max_dim = gpu.max_dim();
    let (entry, slots) = match seg {
        // two words (compensated high and low parts) per partial
        Segments::Whole => ("dots_whole", 2 * k.st().total_groups as usize),
        Segments::Rows { .. } => ("dots_rows", nseg),
        Segments::Cols { cols } => ("dots_cols", (n / cols).div_ceil(256) * cols),
    };
    let bytes = k.accumulate(&SHADER, entry, (slots * np * 4) as u64, |s| match seg {
        Segments::Whole => s.quad_grid(),
        Segments::Rows { len } => grid(s.len.div_ceil(len), max_dim),
        Segments::Cols { cols } => grid(cols.div_ceil(16) * (s.len / cols).div_ceil(256), max_dim),
    })?;
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

pub fn combine(
    gpu: &Gpu,
    job: &Job,
    terms: &[Vector],
    seg: Segments,
    coefs: &[f32],
    out: &mut [u8],
) -> Result<()> {
    if job.numel == 0 {
        return Ok(());
    }
    let words: Vec<u32> = coefs.iter().map(|c| c.to_bits()).collect();
    let mut k = gpu
        .launch(job, 0)?
        .aux(gpu.storage_init("coefficients", &words));
    segment_header(&mut k.header, seg);
    k.header.n_items = terms.len() as u32;
    push_vectors(&mut k.models, terms);
    k.write(&SHADER, "combine", out)
}
