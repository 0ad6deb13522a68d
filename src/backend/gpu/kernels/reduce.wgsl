// Per-vector statistics and combines (Model Stock, the SLERP family, Karcher).
//
// job.models holds the n_models models, then n_items *vector entries*: aux 0 = a model
// (index in rng_model), 1 = the base, 2 = a model minus the base. Dot products take their
// pairs of vector entries from `aux` (two words each); combines take one coefficient per
// term and segment from `aux` (f32 bits, segment-major).
//
// Segments: 0 the whole tensor, 1 rows of seg_len contiguous elements, 2 columns (element e
// belongs to column e % seg_len). Partial sums are per 1024-element block (whole, as
// compensated high/low f32 pairs), per row (tiles hold whole rows), or per 256-row chunk and
// column (tiles start on chunks), in f32; the host adds them up in f64 in a fixed order, so
// results do not depend on the tile size.

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

var<workgroup> part_lo: array<f32, 256>;

// Error-free addition (Knuth's TwoSum): a + b = s + e exactly, with s = fl(a + b). Shader
// compilers may simplify (a + b) - a to b, which would spoil e (lavapipe does): the factor
// `opaque_one`, 1.0 at run time but unknown to the compiler (dot products always have pairs),
// hides the sum's origin.
fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let opaque_one = select(0.0, 1.0, job.n_pairs > 0u);
    let s = (a + b) * opaque_one;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    return vec2<f32>(s, e);
}

// Compensated tree sum of (part, part_lo) over the workgroup: the result's two words add up
// to the sum with about f64 accuracy, so Gram matrices of nearly cancelling vectors (the
// SLERP family near antipodal inputs) keep their small differences.
fn reduce_pair(lid: u32) -> vec2<f32> {
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if lid < w {
            let t = two_sum(part[lid], part[lid + w]);
            part[lid] = t.x;
            part_lo[lid] = part_lo[lid] + part_lo[lid + w] + t.y;
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(part[0], part_lo[0]);
    workgroupBarrier();
    return r;
}

// dst[2 * ((wg_base + wg) * n_pairs + p) + {0, 1}]: the high and low words of the partial
@compute @workgroup_size(256)
fn dots_whole(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    let inside = 4u * q < tile.n;
    for (var p = 0u; p < job.n_pairs; p++) {
        var s = vec2<f32>(0.0, 0.0);
        if inside {
            let a = vector4(vec_entry(aux[2u * p]), q);
            let b = vector4(vec_entry(aux[2u * p + 1u]), q);
            for (var l = 0u; l < 4u; l++) {
                if 4u * q + l < tile.n {
                    let t = two_sum(s.x, a[l] * b[l]);
                    s = vec2<f32>(t.x, s.y + t.y);
                }
            }
        }
        part[lid] = s.x;
        part_lo[lid] = s.y;
        let r = reduce_pair(lid);
        if lid == 0u {
            let o = 2u * ((tile.wg_base + wg_linear(wid, nwg)) * job.n_pairs + p);
            dst[o] = bitcast<u32>(r.x);
            dst[o + 1u] = bitcast<u32>(r.y);
        }
    }
}

// One workgroup per row of this tile (tiles hold whole rows): dst[(row * n_pairs + p)]
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
            dst[row * job.n_pairs + p] = bitcast<u32>(r);
        }
    }
}

// Columns in blocks of 16, rows in chunks of 256 (tiles start on a chunk boundary, so the
// partial sums do not depend on the tiling): 16 lanes per column each add 16 rows of the
// chunk, then the lanes are added up. Partial of global chunk h and column c at
// dst[((h * cols + c) * n_pairs + p)].
@compute @workgroup_size(256)
fn dots_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let cols = job.seg_len;
    let blocks = (cols + 15u) / 16u;
    let w = wg_linear(wid, nwg);
    let chunk = w / blocks;
    let cl = lid % 16u;
    let rl = lid / 16u;
    let c = (w % blocks) * 16u + cl;
    let rows = tile.n / cols;
    for (var p = 0u; p < job.n_pairs; p++) {
        var s = 0.0;
        if c < cols {
            let va = vec_entry(aux[2u * p]);
            let vb = vec_entry(aux[2u * p + 1u]);
            for (var k = 0u; k < 16u; k++) {
                let r = chunk * 256u + k * 16u + rl;
                if r < rows {
                    let e = r * cols + c;
                    s = s + vector1(va, e) * vector1(vb, e);
                }
            }
        }
        part[lid] = s;
        workgroupBarrier();
        for (var h = 8u; h > 0u; h = h / 2u) {
            if rl < h {
                part[lid] = part[lid] + part[lid + 16u * h];
            }
            workgroupBarrier();
        }
        if rl == 0u && c < cols {
            let global_chunk = tile.start / cols / 256u + chunk;
            dst[(global_chunk * cols + c) * job.n_pairs + p] = bitcast<u32>(part[cl]);
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
