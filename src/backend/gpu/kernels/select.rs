//! The two primitives rank selection is built on ([`crate::backend::select`]): histograms
//! of key bits, and the index of the q-th element with given key bits (per-workgroup counts
//! of equal keys, then one workgroup's mask of them).

use super::{Shader, COMMON};
use crate::backend::gpu::meta::ModelMeta;
use crate::backend::gpu::{words, Gpu, WG_ELEMS};
use crate::backend::{Job, Source};
use crate::error::{Error, Result};

pub const SHADER: Shader = Shader {
    name: "select.wgsl",
    preludes: &[COMMON],
    body: include_str!("select.wgsl"),
    entries: &["histogram", "count_equal", "equal_bits"],
    stepped: &[],
};

/// The entry of a key source: a model's entry keyed by |delta| (aux 0) or |x| (aux 1), or
/// the variance key (aux 4).
fn source_entry(models: &[ModelMeta], src: Source) -> ModelMeta {
    match src {
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
    }
}

pub fn histogram(gpu: &Gpu, job: &Job, sources: &[(Source, Option<u32>)]) -> Result<Vec<Vec<u64>>> {
    if job.numel == 0 {
        return Ok(vec![vec![0; 1 << 16]; sources.len()]);
    }
    let mut k = gpu.launch(job, 0)?;
    let (header, models) = (k.header, k.models.clone());
    let mut out = Vec::with_capacity(sources.len());
    // At most 64 sources per pass keeps the histogram buffer at 16 MiB.
    for group in sources.chunks(64) {
        k.header = header;
        k.models = models.clone();
        for &(s, filter) in group {
            let mut e = source_entry(&models, s);
            if s == Source::Variance {
                k.header.use_var = 1;
            }
            if let Some(hb) = filter {
                e.aux |= 2;
                e.lo_bits = hb;
            }
            k.models.push(e);
        }
        k.header.n_items = group.len() as u32;
        let bytes = k.accumulate(&SHADER, "histogram", group.len() as u64 * 65536 * 4, |s| {
            s.quad_grid()
        })?;
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

pub fn nth_equal(gpu: &Gpu, job: &Job, src: Source, t: u32, q: u64) -> Result<u32> {
    let mut k = gpu.launch(job, 0)?;
    let mut e = source_entry(&k.models, src);
    e.hi_bits = t;
    k.models.push(e);
    k.header.n_items = 1;
    let total_groups = k.st().total_groups;
    let bytes = k.accumulate(&SHADER, "count_equal", total_groups as u64 * 4, |s| {
        s.quad_grid()
    })?;
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
    let ti = k
        .st()
        .tiles
        .iter()
        .position(|s| w >= s.wg_base && w < s.wg_base + s.groups())
        .expect("workgroup inside a tile");
    let spec = k.st().tiles[ti];
    k.header.focus = w - spec.wg_base;
    k.only_tile(ti);
    let bytes = k.accumulate(&SHADER, "equal_bits", 32 * 4, |s| s.quad_grid())?;
    let mask = words(&bytes);
    let j = (0..WG_ELEMS)
        .filter(|j| mask[j / 32] >> (j % 32) & 1 == 1)
        .nth(rem as usize)
        .ok_or_else(|| Error::Gpu(format!("{}: tie mask disagrees with the counts", job.name)))?;
    Ok((spec.start + k.header.focus as usize * WG_ELEMS + j) as u32)
}
