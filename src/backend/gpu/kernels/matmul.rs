//! Dense linear algebra: the tiled matrix product, and the randomised SVD built on it.
//! Not tied to a job: the matrices go up as one `src` buffer with a placeholder tile.

use super::{Shader, COMMON};
use crate::backend::gpu::dispatch::Dispatch;
use crate::backend::gpu::meta::{MetaHeader, TileUbo};
use crate::backend::gpu::{floats, Gpu, TileGpu};
use crate::error::{Error, Result};
use crate::linalg::{Mat, Svd};

pub const SHADER: Shader = Shader {
    name: "matmul.wgsl",
    preludes: &[COMMON],
    body: include_str!("matmul.wgsl"),
    entries: &["matmul"],
    stepped: &[],
};

/// The tiled product kernel; problems larger than one storage binding go to the CPU.
pub fn matmul(gpu: &Gpu, a: &Mat, b: &Mat, ta: bool, tb: bool) -> Result<Mat> {
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
    let limit = gpu.ctx.limits.max_storage_buffer_binding_size as usize;
    let max_dim = gpu.max_dim() as usize;
    if (a.data.len() + b.data.len()) * 4 > limit
        || m * n * 4 > limit
        || n.div_ceil(16) > max_dim
        || m.div_ceil(16) > max_dim
    {
        log::debug!("{m}x{k1}x{n} product is larger than a GPU binding; computing it on the CPU");
        return crate::linalg::matmul(a, b, ta, tb);
    }
    let words: Vec<u32> = a.data.iter().chain(&b.data).map(|x| x.to_bits()).collect();
    let src = gpu.storage_init("matmul inputs", &words);
    let ubo = gpu.ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("unused tile"),
        size: size_of::<TileUbo>() as u64,
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
    let meta = gpu.meta_buffer(&h, &[]);
    let dst = gpu.storage("matmul output", (m * n * 4) as u64);
    let pipe = gpu.ctx.pipeline(&SHADER, "matmul")?;
    let mut enc = gpu.ctx.device.create_command_encoder(&Default::default());
    Dispatch::new(&pipe, &tg, &meta, &dst).encode(
        gpu,
        &mut enc,
        (n.div_ceil(16) as u32, m.div_ceil(16) as u32),
    );
    gpu.ctx.queue.submit([enc.finish()]);
    let bytes = gpu.download(&dst, (m * n * 4) as u64)?;
    Ok(Mat {
        rows: m,
        cols: n,
        data: floats(&bytes),
    })
}

/// Randomised range finder (Halko, Martinsson & Tropp 2011) with the products on the GPU:
/// Y = A·Ω for a Gaussian-like Ω of rank + 10 columns, two power iterations, then the
/// small dense SVD of Qᵀ·A on the host. Small or nearly full-rank problems go straight
/// to the dense SVD.
pub fn svd(gpu: &Gpu, a: &Mat, rank: Option<usize>) -> Result<Svd> {
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
    let mut q = crate::linalg::orthonormal_basis(&matmul(gpu, a, &omega, false, false)?);
    for _ in 0..2 {
        let z = crate::linalg::orthonormal_basis(&matmul(gpu, a, &q, true, false)?);
        q = crate::linalg::orthonormal_basis(&matmul(gpu, a, &z, false, false)?);
    }
    let small = matmul(gpu, &q, a, true, false)?;
    let d = crate::linalg::svd(&small, Some(k))?;
    Ok(Svd {
        u: crate::linalg::matmul(&q, &d.u, false, false)?,
        s: d.s,
        vt: d.vt,
    })
}
