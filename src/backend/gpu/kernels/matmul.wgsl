// Tiled matrix product C = op(A) · op(B) in f32, 16x16 tiles through workgroup memory.
// `src` holds A (row-major, a_rows x a_cols) at word 0 and B (b_rows x b_cols) at word
// b_offset; op() transposes when flagged. C (m x n, row-major) goes to `dst`.
// Dimensions travel in the metadata header:
//   n_items = m, n_pairs = n, row_len = k (the inner dimension),
//   row_pad = a_cols, n_entries = b_cols, out_offset = b_offset, row_inner bit 0: op(A) = Aᵀ,
//   bit 1: op(B) = Bᵀ.

@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

var<workgroup> ta_tile: array<array<f32, 16>, 16>;
var<workgroup> tb_tile: array<array<f32, 16>, 16>;

fn a_at(i: u32, kk: u32) -> f32 {
    // op(A)[i, kk]
    if (job.row_inner & 1u) != 0u {
        return bitcast<f32>(src[kk * job.row_pad + i]);
    }
    return bitcast<f32>(src[i * job.row_pad + kk]);
}

fn b_at(kk: u32, j: u32) -> f32 {
    // op(B)[kk, j]
    if (job.row_inner & 2u) != 0u {
        return bitcast<f32>(src[job.out_offset + j * job.n_entries + kk]);
    }
    return bitcast<f32>(src[job.out_offset + kk * job.n_entries + j]);
}

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let m = job.n_items;
    let n = job.n_pairs;
    let k = job.row_len;
    let row = wid.y * 16u + lid3.y;
    let col = wid.x * 16u + lid3.x;
    var acc = 0.0;
    let steps = (k + 15u) / 16u;
    for (var s = 0u; s < steps; s++) {
        let ka = s * 16u + lid3.x;
        let kb = s * 16u + lid3.y;
        var av = 0.0;
        if row < m && ka < k {
            av = a_at(row, ka);
        }
        var bv = 0.0;
        if kb < k && col < n {
            bv = b_at(kb, col);
        }
        ta_tile[lid3.y][lid3.x] = av;
        tb_tile[lid3.y][lid3.x] = bv;
        workgroupBarrier();
        for (var t = 0u; t < 16u; t++) {
            acc = acc + ta_tile[lid3.y][t] * tb_tile[t][lid3.x];
        }
        workgroupBarrier();
    }
    if row < m && col < n {
        dst[row * n + col] = bitcast<u32>(acc);
    }
}
