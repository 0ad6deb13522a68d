//! Dense linear algebra for the methods that need it (TSV-M, OPCM, LoRA): small row-major
//! f32 matrices on the host, with the CPU reference of matrix products and singular value
//! decompositions computed in f64 by `faer`.
//!
//! Backends provide `matmul` and a truncated `svd`; the CPU ones here are exact (full thin
//! SVD, then truncated), the GPU ones use tiled kernels and a randomised range finder whose
//! last, small step is the dense SVD here.

use crate::error::{Error, Result};

/// A row-major f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn from_fn(rows: usize, cols: usize, mut f: impl FnMut(usize, usize) -> f32) -> Mat {
        let mut m = Mat::zeros(rows, cols);
        for i in 0..rows {
            for j in 0..cols {
                m.data[i * cols + j] = f(i, j);
            }
        }
        m
    }

    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.cols + j]
    }

    pub fn transpose(&self) -> Mat {
        Mat::from_fn(self.cols, self.rows, |i, j| self.at(j, i))
    }

    /// Frobenius norm, in f64.
    pub fn norm(&self) -> f64 {
        self.data
            .iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt()
    }

    pub fn to_faer(&self) -> faer::Mat<f64> {
        faer::Mat::from_fn(self.rows, self.cols, |i, j| self.at(i, j) as f64)
    }

    pub fn from_faer(m: faer::MatRef<'_, f64>) -> Mat {
        Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
    }

    /// The leading `k` columns.
    pub fn first_cols(&self, k: usize) -> Mat {
        Mat::from_fn(self.rows, k.min(self.cols), |i, j| self.at(i, j))
    }

    /// The leading `k` rows.
    pub fn first_rows(&self, k: usize) -> Mat {
        let k = k.min(self.rows);
        Mat {
            rows: k,
            cols: self.cols,
            data: self.data[..k * self.cols].to_vec(),
        }
    }
}

/// A (truncated) singular value decomposition A ≈ U · diag(s) · Vt, singular values
/// descending, U m×k, Vt k×n.
#[derive(Clone, Debug)]
pub struct Svd {
    pub u: Mat,
    pub s: Vec<f32>,
    pub vt: Mat,
}

impl Svd {
    /// U · diag(s) · Vt.
    pub fn reconstruct(&self) -> Mat {
        let k = self.s.len();
        Mat::from_fn(self.u.rows, self.vt.cols, |i, j| {
            let mut acc = 0.0f64;
            for r in 0..k {
                acc += self.u.at(i, r) as f64 * self.s[r] as f64 * self.vt.at(r, j) as f64;
            }
            acc as f32
        })
    }
}

/// C = op(A) · op(B), op = transpose when asked, computed in f64.
pub fn matmul(a: &Mat, b: &Mat, ta: bool, tb: bool) -> Result<Mat> {
    let fa = a.to_faer();
    let fb = b.to_faer();
    let (oa, ob) = (
        if ta { fa.transpose().to_owned() } else { fa },
        if tb { fb.transpose().to_owned() } else { fb },
    );
    if oa.ncols() != ob.nrows() {
        return Err(Error::Other(format!(
            "matrix product of {}x{} and {}x{}: inner dimensions differ",
            oa.nrows(),
            oa.ncols(),
            ob.nrows(),
            ob.ncols()
        )));
    }
    Ok(Mat::from_faer((&oa * &ob).as_ref()))
}

/// The thin SVD of `a` (in f64), truncated to `rank` when given.
pub fn svd(a: &Mat, rank: Option<usize>) -> Result<Svd> {
    let k = a.rows.min(a.cols);
    if k == 0 {
        return Ok(Svd {
            u: Mat::zeros(a.rows, 0),
            s: Vec::new(),
            vt: Mat::zeros(0, a.cols),
        });
    }
    let f = a.to_faer();
    let d = f.thin_svd().map_err(|e| {
        Error::Other(format!(
            "SVD of a {}x{} matrix did not converge: {e:?}",
            a.rows, a.cols
        ))
    })?;
    let r = rank.unwrap_or(k).min(k);
    let u = Mat::from_faer(d.U().as_ref()).first_cols(r);
    let s: Vec<f32> = (0..r).map(|i| d.S()[i] as f32).collect();
    let vt = Mat::from_faer(d.V().transpose()).first_rows(r);
    Ok(Svd { u, s, vt })
}

/// An orthonormal basis of the columns of `a` (thin Q of a QR decomposition, f64).
pub fn orthonormal_basis(a: &Mat) -> Mat {
    let f = a.to_faer();
    Mat::from_faer(f.qr().compute_thin_Q().as_ref())
}

/// The orthogonal polar factor U·Vt of `a` (the closest matrix with orthonormal columns or
/// rows), via its SVD.
pub fn polar(a: &Mat) -> Result<Mat> {
    let d = svd(a, None)?;
    matmul(&d.u, &d.vt, false, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(rows: usize, cols: usize, seed: u32) -> Mat {
        let mut s = seed.max(1);
        Mat::from_fn(rows, cols, |_, _| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) - 0.5
        })
    }

    #[test]
    fn svd_reconstructs_and_orders() {
        let a = pseudo(7, 5, 3);
        let d = svd(&a, None).unwrap();
        assert!(d.s.windows(2).all(|w| w[0] >= w[1]));
        let r = d.reconstruct();
        let err: f64 = a
            .data
            .iter()
            .zip(&r.data)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(err < 1e-5 * a.norm(), "{err}");
        // U has orthonormal columns
        let utu = matmul(&d.u, &d.u, true, false).unwrap();
        for i in 0..5 {
            for j in 0..5 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((utu.at(i, j) - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn matmul_by_hand() {
        let a = Mat {
            rows: 2,
            cols: 3,
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let b = Mat {
            rows: 3,
            cols: 2,
            data: vec![7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
        };
        // [1 2 3; 4 5 6] · [7 8; 9 10; 11 12] = [58 64; 139 154]
        assert_eq!(
            matmul(&a, &b, false, false).unwrap().data,
            vec![58.0, 64.0, 139.0, 154.0]
        );
        // Aᵀ·Aᵀ is 3x2 · 2x3... ill-formed: inner dimensions 2 and 3
        assert!(matmul(&a, &a, true, true).is_err());
        assert_eq!(
            matmul(&b, &a, true, true).unwrap().data,
            vec![58.0, 139.0, 64.0, 154.0]
        );
    }
}
