//! Matrix products and truncated SVDs: every backend against a float64 reference computed in
//! the test, and the GPU's randomised SVD against the CPU's exact one on singular values and
//! on the subspaces they span.

use crate::common::{Backend, Lcg};
use smelt::linalg::{self, Mat};

fn random(rows: usize, cols: usize, seed: u64) -> Mat {
    // Spread the seeds: an LCG started from neighbouring states gives correlated streams.
    let mut g = Lcg(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d);
    Mat::from_fn(rows, cols, |_, _| g.sym())
}

/// op(A)·op(B) in f64 by the textbook triple loop.
fn naive(a: &Mat, b: &Mat, ta: bool, tb: bool) -> Vec<f64> {
    let at = |i: usize, k: usize| if ta { a.at(k, i) } else { a.at(i, k) } as f64;
    let bt = |k: usize, j: usize| if tb { b.at(j, k) } else { b.at(k, j) } as f64;
    let m = if ta { a.cols } else { a.rows };
    let k = if ta { a.rows } else { a.cols };
    let n = if tb { b.rows } else { b.cols };
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|kk| at(i, kk) * bt(kk, j)).sum();
        }
    }
    c
}

fn matmul_matches_f64_reference_on_awkward_shapes(name: &str, be: &dyn Backend) {
    // (m, k, n): single elements, sizes that are not multiples of the 16x16 tile, and a
    // long inner dimension.
    let shapes = [
        (1, 1, 1),
        (7, 3, 5),
        (17, 33, 15),
        (64, 16, 48),
        (5, 1000, 3),
        (129, 31, 70),
    ];
    for (s, &(m, k, n)) in shapes.iter().enumerate() {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta {
                random(k, m, s as u64 * 4 + 1)
            } else {
                random(m, k, s as u64 * 4 + 1)
            };
            let b = if tb {
                random(n, k, s as u64 * 4 + 2)
            } else {
                random(k, n, s as u64 * 4 + 2)
            };
            let got = be.matmul(&a, &b, ta, tb).unwrap();
            assert_eq!((got.rows, got.cols), (m, n), "{name} {m}x{k}x{n}");
            let want = naive(&a, &b, ta, tb);
            // f32 accumulation of k products of magnitude ≤ 1: error ≲ k·eps.
            let tol = 4.0 * k as f64 * f32::EPSILON as f64;
            for (i, (g, w)) in got.data.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= tol,
                    "{name}: {m}x{k}x{n} ta={ta} tb={tb} element {i}: {g} vs {w}"
                );
            }
        }
    }
}

backend_test!(matmul_matches_f64_reference_on_awkward_shapes);

fn matmul_rejects_mismatched_inner_dimensions(name: &str, be: &dyn Backend) {
    let err = be
        .matmul(&random(3, 4, 1), &random(5, 2, 2), false, false)
        .unwrap_err();
    assert!(
        err.to_string().contains("inner dimensions"),
        "{name}: {err}"
    );
}

backend_test!(matmul_rejects_mismatched_inner_dimensions);

/// A matrix of known spectrum: U diag(sigma) Vᵀ with random orthonormal U, V, plus optional
/// small noise.
fn with_spectrum(m: usize, n: usize, sigma: &[f32], noise: f32, seed: u64) -> Mat {
    let u = linalg::orthonormal_basis(&random(m, sigma.len(), seed));
    let v = linalg::orthonormal_basis(&random(n, sigma.len(), seed + 1));
    let mut g = Lcg((seed + 2).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    Mat::from_fn(m, n, |i, j| {
        let mut acc = 0.0f64;
        for (r, s) in sigma.iter().enumerate() {
            acc += u.at(i, r) as f64 * *s as f64 * v.at(j, r) as f64;
        }
        acc as f32 + noise * g.sym()
    })
}

/// ‖(I − P_a) B‖ for orthonormal columns a and b: the sine of the largest principal angle
/// (up to √k) between the two subspaces.
fn subspace_gap(a: &Mat, b: &Mat) -> f64 {
    let atb = linalg::matmul(a, b, true, false).unwrap();
    let proj = linalg::matmul(a, &atb, false, false).unwrap();
    b.data
        .iter()
        .zip(&proj.data)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn svd_recovers_a_known_spectrum_on_every_backend(name: &str, be: &dyn Backend) {
    // 300x200 (large enough for the GPU's randomised path), rank 12 with decaying singular
    // values and a noise floor well below the smallest of them.
    let sigma: Vec<f32> = (0..12).map(|i| 50.0 * 0.8f32.powi(i)).collect();
    let a = with_spectrum(300, 200, &sigma, 1e-3, 7);
    let exact = linalg::svd(&a, Some(8)).unwrap();
    for (i, s) in exact.s.iter().enumerate() {
        assert!(
            (s - sigma[i]).abs() < 0.05,
            "cpu reference sigma {i}: {:?} vs {sigma:?}",
            exact.s
        );
    }
    let d = be.svd(&a, Some(8)).unwrap();
    assert_eq!(d.s.len(), 8, "{name}");
    assert_eq!(
        (d.u.rows, d.u.cols, d.vt.rows, d.vt.cols),
        (300, 8, 8, 200),
        "{name}"
    );
    for (i, (g, w)) in d.s.iter().zip(&exact.s).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * exact.s[0],
            "{name}: sigma {i}: {g} vs {w}"
        );
    }
    let gap_u = subspace_gap(&exact.u, &d.u);
    let gap_v = subspace_gap(&exact.vt.transpose(), &d.vt.transpose());
    assert!(
        gap_u < 1e-3 && gap_v < 1e-3,
        "{name}: subspace gaps U {gap_u}, V {gap_v}"
    );
    // The truncation error is the energy of the discarded singular values.
    let r = d.reconstruct();
    let err = a
        .data
        .iter()
        .zip(&r.data)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let tail = linalg::svd(&a, None).unwrap().s[8..]
        .iter()
        .map(|s| (*s as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        err <= tail * 1.01 + 1e-4,
        "{name}: rank-8 error {err} vs optimal {tail}"
    );
}

backend_test!(svd_recovers_a_known_spectrum_on_every_backend);

fn svd_of_small_and_degenerate_matrices(name: &str, be: &dyn Backend) {
    // Hand-computed: diag(3, 2) padded with a zero row has singular values 3 and 2.
    let a = Mat {
        rows: 3,
        cols: 2,
        data: vec![0.0, 2.0, 3.0, 0.0, 0.0, 0.0],
    };
    let d = be.svd(&a, None).unwrap();
    assert!(
        (d.s[0] - 3.0).abs() < 1e-6 && (d.s[1] - 2.0).abs() < 1e-6,
        "{name}: {:?}",
        d.s
    );
    // A zero matrix has zero singular values and reconstructs to zero.
    let z = Mat::zeros(70, 90);
    let d = be.svd(&z, Some(5)).unwrap();
    assert!(d.s.iter().all(|s| *s == 0.0), "{name}: {:?}", d.s);
    assert!(d.reconstruct().data.iter().all(|x| *x == 0.0), "{name}");
    // Asking for more than min(m, n) gives min(m, n).
    assert_eq!(
        be.svd(&random(4, 9, 3), Some(20)).unwrap().s.len(),
        4,
        "{name}"
    );
}

backend_test!(svd_of_small_and_degenerate_matrices);
