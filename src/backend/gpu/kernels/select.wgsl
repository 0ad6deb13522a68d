// Rank selection on the f32 bit patterns of non-negative keys (integer order is float
// order). The host drives src/backend/select.rs::select_with over these kernels: a histogram
// of the high 16 bits, a histogram of the low 16 bits inside one high bucket, and, when a tie
// at the threshold must be split, the position of the q-th tied element.
//
// job.models holds the n_models models, then n_items *sources*: the input (offset, dtype)
// whose keys are ranked; aux bit 0 set for |x|, clear for |x - base|; bit 2 set for the
// variance key of the element; bit 1 set for the filtered second level, bucket in lo_bits.

@group(0) @binding(2) var<storage, read_write> hist: array<atomic<u32>>;

fn source(si: u32) -> ModelMeta {
    return job.models[job.n_models + si];
}

fn keys(s: ModelMeta, q: u32) -> vec4<u32> {
    if (s.aux & 4u) != 0u {
        return bitcast<vec4<u32>>(abs(variance4(q, load_base4(q))));
    }
    var x = load4(s.offset, s.dtype, q);
    if (s.aux & 1u) == 0u {
        x = x - load_base4(q);
    }
    return bitcast<vec4<u32>>(abs(x));
}

@compute @workgroup_size(256)
fn histogram(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    if 4u * q >= tile.n {
        return;
    }
    for (var si = 0u; si < job.n_items; si++) {
        let s = source(si);
        let a = keys(s, q);
        let filtered = (s.aux & 2u) != 0u;
        for (var l = 0u; l < 4u; l++) {
            if 4u * q + l < tile.n {
                if !filtered {
                    atomicAdd(&hist[si * 65536u + (a[l] >> 16u)], 1u);
                } else if (a[l] >> 16u) == s.lo_bits {
                    atomicAdd(&hist[si * 65536u + (a[l] & 0xffffu)], 1u);
                }
            }
        }
    }
}

var<workgroup> count: atomic<u32>;

// Per workgroup: how many elements of source 0 have key bits == hi_bits.
@compute @workgroup_size(256)
fn count_equal(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    if lid == 0u {
        atomicStore(&count, 0u);
    }
    workgroupBarrier();
    let q = quad_index(wid, nwg, lid);
    if 4u * q < tile.n {
        let s = source(0u);
        let a = keys(s, q);
        var c = 0u;
        for (var l = 0u; l < 4u; l++) {
            if 4u * q + l < tile.n && a[l] == s.hi_bits {
                c = c + 1u;
            }
        }
        if c > 0u {
            atomicAdd(&count, c);
        }
    }
    workgroupBarrier();
    if lid == 0u {
        atomicStore(&hist[tile.wg_base + wg_linear(wid, nwg)], atomicLoad(&count));
    }
}

// For workgroup job.focus of this tile only: a 1024-bit mask (32 words) of the elements
// of source 0 whose key bits == hi_bits, bit j of word j/32 for local element j.
@compute @workgroup_size(256)
fn equal_bits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    if wg_linear(wid, nwg) != job.focus {
        return;
    }
    let q = quad_index(wid, nwg, lid);
    if 4u * q >= tile.n {
        return;
    }
    let s = source(0u);
    let a = keys(s, q);
    for (var l = 0u; l < 4u; l++) {
        if 4u * q + l < tile.n && a[l] == s.hi_bits {
            let j = 4u * lid + l;
            atomicOr(&hist[j / 32u], 1u << (j % 32u));
        }
    }
}
