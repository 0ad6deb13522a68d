//! Helpers of the methods that work on whole matrices on the host (TSV-M, WIDEN, ...):
//! the job's vectors as f32, computed by the backend, and the final `base + delta`.

use crate::backend::{Backend, Job, Segments, Vector};
use crate::dtype::{self, DType};
use crate::error::Result;
use crate::linalg::Mat;

/// The values of each vector (model, base or delta, rounded to the load dtype as every
/// primitive loads them), computed by the backend's `combine` into f32. `scale[k]`
/// multiplies vector k (one f32 product, as torch's `tensor * scalar`).
pub fn vectors(
    b: &dyn Backend,
    job: &Job,
    vecs: &[Vector],
    scale: &[f32],
) -> Result<Vec<Vec<f32>>> {
    let sub = Job::new(
        job.name,
        job.base,
        job.models.clone(),
        job.load_dtype,
        DType::F32,
    );
    let mut out = Vec::with_capacity(vecs.len());
    let mut bytes = vec![0u8; job.numel * 4];
    for (k, v) in vecs.iter().enumerate() {
        let r = b.combine(&sub, &[*v], Segments::Whole, &[scale[k]], &mut bytes);
        if let Err(e) = r {
            b.end_job(&sub);
            return Err(e);
        }
        let mut f = vec![0f32; job.numel];
        dtype::decode(DType::F32, &bytes, &mut f);
        out.push(f);
    }
    b.end_job(&sub);
    Ok(out)
}

/// `out = base + delta` (one f32 addition per element), written in the job's output dtype.
pub fn write_base_plus(b: &dyn Backend, job: &Job, delta: &[f32], out: &mut [u8]) -> Result<()> {
    let base = vectors(b, job, &[Vector::Base], &[1.0])?.pop().unwrap();
    let sum: Vec<f32> = base.iter().zip(delta).map(|(x, d)| x + d).collect();
    dtype::encode(job.out_dtype, &sum, out);
    Ok(())
}

/// A row-major `rows × cols` matrix over `data`.
pub fn mat(rows: usize, cols: usize, data: Vec<f32>) -> Mat {
    debug_assert_eq!(rows * cols, data.len());
    Mat { rows, cols, data }
}

/// Input embeddings (`model.embed_tokens.weight`, `wte`, `word_embeddings`): nn.Embedding
/// in the reference implementations, which treat them apart from linear layers. Output
/// heads (`lm_head`) are linear layers.
pub fn is_input_embedding(name: &str) -> bool {
    let stem = name.strip_suffix(".weight").unwrap_or(name);
    let last = stem.rsplit('.').next().unwrap_or(stem);
    last.contains("embed") || last == "wte" || last == "word_embeddings"
}
