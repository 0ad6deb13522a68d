// Per-vector statistics and combines (Model Stock, the SLERP family, Karcher).
//
// job.models holds the n_models models, then n_items *vector entries*: aux 0 = a model
// (index in rng_model), 1 = the base, 2 = a model minus the base. Dot products take their
// pairs of vector entries from `aux` (two words each); combines take one coefficient per
// term and segment from `aux` (f32 bits, segment-major).
//
// Segments: 0 the whole tensor, 1 rows of seg_len contiguous elements, 2 columns (element e
// belongs to column e % seg_len). Partial sums are f32 per workgroup (whole), per row piece
// (rows: a row split by a tile boundary gives two pieces), or per tile and column; the host
// adds them up in f64 in a fixed order.

fn vec_entry(k: u32) -> ModelMeta {
    return job.models[job.n_models + k];
}

var<workgroup> part: array<f32, 256>;

fn reduce_part(lid: u32) -> f32 {
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if lid < w {
            part[lid] = part[lid] + part[lid + w];
        }
        workgroupBarrier();
    }
    let r = part[0];
    workgroupBarrier();
    return r;
}

// dst[((wg_base + wg) * n_pairs + p)]
@compute @workgroup_size(256)
fn dots_whole(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    let inside = 4u * q < tile.n;
    for (var p = 0u; p < job.n_pairs; p++) {
        var s = 0.0;
        if inside {
            let a = vector4(vec_entry(aux[2u * p]), q);
            let b = vector4(vec_entry(aux[2u * p + 1u]), q);
            for (var l = 0u; l < 4u; l++) {
                if 4u * q + l < tile.n {
                    s = s + a[l] * b[l];
                }
            }
        }
        part[lid] = s;
        let r = reduce_part(lid);
        if lid == 0u {
            dst[(tile.wg_base + wg_linear(wid, nwg)) * job.n_pairs + p] = bitcast<u32>(r);
        }
    }
}

// One workgroup per piece of row in this tile: dst[((first_row + tile.index + w) * n_pairs + p)]
@compute @workgroup_size(256)
fn dots_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let len = job.seg_len;
    let first = tile.start / len;
    let row = first + wg_linear(wid, nwg);
    if row * len >= tile.start + tile.n {
        return;
    }
    let lo = max(row * len, tile.start) - tile.start;
    let hi = min((row + 1u) * len, tile.start + tile.n) - tile.start;
    for (var p = 0u; p < job.n_pairs; p++) {
        let va = vec_entry(aux[2u * p]);
        let vb = vec_entry(aux[2u * p + 1u]);
        // two-level sum (blocks of 32 terms): the error grows with the block count, not the
        // row length, and no compiler rewrite can undo it
        var s = 0.0;
        var block = 0.0;
        var k = 0u;
        for (var e = lo + lid; e < hi; e += WG) {
            block = block + vector1(va, e) * vector1(vb, e);
            k = k + 1u;
            if k == 32u {
                s = s + block;
                block = 0.0;
                k = 0u;
            }
        }
        part[lid] = s + block;
        let r = reduce_part(lid);
        if lid == 0u {
            dst[(row + tile.index) * job.n_pairs + p] = bitcast<u32>(r);
        }
    }
}

// Columns in blocks of 16 per workgroup, each column summed by 16 lanes over interleaved
// rows, two-level within a lane, then across lanes: dst[((tile.index * cols + c) * n_pairs + p)]
@compute @workgroup_size(256)
fn dots_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let cols = job.seg_len;
    let cl = lid % 16u;
    let rl = lid / 16u;
    let c = wg_linear(wid, nwg) * 16u + cl;
    let e0 = (c + cols - tile.start % cols) % cols + rl * cols;
    for (var p = 0u; p < job.n_pairs; p++) {
        var s = 0.0;
        if c < cols {
            let va = vec_entry(aux[2u * p]);
            let vb = vec_entry(aux[2u * p + 1u]);
            var block = 0.0;
            var k = 0u;
            for (var e = e0; e < tile.n; e += 16u * cols) {
                block = block + vector1(va, e) * vector1(vb, e);
                k = k + 1u;
                if k == 32u {
                    s = s + block;
                    block = 0.0;
                    k = 0u;
                }
            }
            s = s + block;
        }
        part[lid] = s;
        workgroupBarrier();
        for (var w = 8u; w > 0u; w = w / 2u) {
            if rl < w {
                part[lid] = part[lid] + part[lid + 16u * w];
            }
            workgroupBarrier();
        }
        if rl == 0u && c < cols {
            dst[(tile.index * cols + c) * job.n_pairs + p] = bitcast<u32>(part[cl]);
        }
        workgroupBarrier();
    }
}

fn coef(k: u32, g: u32) -> f32 {
    var s = 0u;
    if job.seg_kind == 1u {
        s = g / job.seg_len;
    } else if job.seg_kind == 2u {
        s = g % job.seg_len;
    }
    return bitcast<f32>(aux[s * job.n_items + k]);
}

// out = Σ_k coef(k, segment) · term_k, in term order from zero.
@compute @workgroup_size(256)
fn combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    if 4u * q >= tile.n {
        return;
    }
    let g = tile.start + 4u * q;
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < job.n_items; k++) {
        let v = vector4(vec_entry(k), q);
        var c: vec4<f32>;
        for (var l = 0u; l < 4u; l++) {
            c[l] = coef(k, min(g + l, tile.start + tile.n - 1u));
        }
        acc = acc + c * v;
    }
    store4(q, acc);
}
