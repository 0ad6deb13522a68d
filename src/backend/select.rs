//! Exact rank selection from two primitives any backend provides: a histogram of key bits
//! ([`Backend::histogram`](super::Backend::histogram)) and the index of the q-th element with given key bits
//! ([`Backend::nth_equal`](super::Backend::nth_equal)). Backend-neutral: it sees neither the CPU's chunks nor the
//! GPU's tiles, only the counts those primitives return.

use super::{Job, Query, RankCut, Source};
use crate::error::Result;

/// The two-level radix selection shared by the backends: a histogram of the high 16 bits of
/// the keys finds the bucket holding rank k; a histogram of the low 16 bits inside that
/// bucket finds the exact threshold; when the threshold value is tied and only some of the
/// tied elements fit, the index of the last one that fits is found in index order.
pub fn select_with(
    job: &Job,
    queries: &[Query],
    hist: impl Fn(&Job, &[(Source, Option<u32>)]) -> Result<Vec<Vec<u64>>>,
    nth_equal: impl Fn(&Job, Source, u32, u64) -> Result<u32>,
) -> Result<Vec<RankCut>> {
    let n = job.numel as u64;
    let edge = |k: u64| if k == 0 { RankCut::NONE } else { RankCut::ALL };
    let mut out: Vec<RankCut> = queries.iter().map(|q| edge(q.k)).collect();
    // Level 1, one histogram per distinct source.
    let mut srcs: Vec<Source> = Vec::new();
    for q in queries {
        if q.k > 0 && q.k < n && !srcs.contains(&q.source) {
            srcs.push(q.source);
        }
    }
    if srcs.is_empty() {
        return Ok(out);
    }
    let h1 = hist(job, &srcs.iter().map(|s| (*s, None)).collect::<Vec<_>>())?;
    // Level 2 for each distinct (source, high bucket).
    let mut level2: Vec<(Source, u32)> = Vec::new();
    let mut first: Vec<Option<(u32, u64)>> = Vec::new();
    for q in queries {
        if q.k == 0 || q.k >= n {
            first.push(None);
            continue;
        }
        let si = srcs.iter().position(|s| *s == q.source).unwrap();
        let (hb, above) = bucket_for(&h1[si], q.k, 0);
        if !level2.contains(&(q.source, hb)) {
            level2.push((q.source, hb));
        }
        first.push(Some((hb, above)));
    }
    let h2 = hist(
        job,
        &level2
            .iter()
            .map(|(s, hb)| (*s, Some(*hb)))
            .collect::<Vec<_>>(),
    )?;
    for (qi, q) in queries.iter().enumerate() {
        let Some((hb, above)) = first[qi] else {
            continue;
        };
        let li = level2.iter().position(|x| *x == (q.source, hb)).unwrap();
        let (lb, c_gt) = bucket_for(&h2[li], q.k, above);
        let t = (hb << 16) | lb;
        let eq = h2[li][lb as usize];
        let quota = q.k - c_gt;
        out[qi] = if quota == eq {
            RankCut {
                bits: t,
                index: u32::MAX,
            }
        } else {
            RankCut {
                bits: t,
                index: nth_equal(job, q.source, t, quota - 1)? + 1,
            }
        };
    }
    Ok(out)
}

/// Finds the bucket holding the element of descending rank `k - 1` in a histogram, given
/// `above` elements already known to rank higher. Returns (bucket, count strictly above it).
fn bucket_for(h: &[u64], k: u64, above: u64) -> (u32, u64) {
    let mut acc = above;
    for b in (0..h.len()).rev() {
        if acc + h[b] >= k {
            return (b as u32, acc);
        }
        acc += h[b];
    }
    unreachable!("rank {k} beyond the histogram's total {acc}")
}

/// In a [`Backend::histogram`](super::Backend::histogram) (summed over any number of jobs): the bucket holding
/// ascending position `j`, and `j`'s position inside it.
pub fn bucket_of(h: &[u64], j: u64) -> (u32, u64) {
    let mut cum = 0u64;
    for (b, &c) in h.iter().enumerate() {
        if cum + c > j {
            return (b as u32, j - cum);
        }
        cum += c;
    }
    unreachable!("position {j} beyond the histogram's {cum} elements")
}

/// Rounds a count product like Python's `int(density * n)` (truncation of the f64 product).
pub fn py_int_mul(fraction: f64, n: usize) -> u64 {
    let p = fraction * n as f64;
    if p <= 0.0 {
        0
    } else {
        p as u64
    }
}
