// Ascending rank of |delta| within rows (DELLA), by a bitonic sort of (key, position) pairs
// per row, padded to a power of two. Keys are the f32 bits of |x - base| (integer order is
// float order); the position breaks ties, lower first, so the order is total and a bitonic
// network (which is not stable) still gives the one right answer.
//
// A tile holds whole slabs of rows: element (o, j, i) of a [outer, len, inner] view is at
// tile-local index (o·len + j)·inner + i, and row r = o·inner + i. Each row owns row_pad
// consecutive sort entries of two words (key, position).

@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

struct Step {
    k: u32,
    j: u32,
    _p0: u32,
    _p1: u32,
}

@group(1) @binding(0) var<uniform> step: Step;

fn entry_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return wg_linear(wid, nwg) * WG + lid;
}

fn element_of(r: u32, j: u32) -> u32 {
    let inner = job.row_inner;
    return ((r / inner) * job.row_len + j) * inner + r % inner;
}

// Sort entries of model job.focus, into dst.
@compute @workgroup_size(256)
fn rank_init(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = entry_id(wid, nwg, lid);
    if id >= job.n_entries {
        return;
    }
    let r = id / job.row_pad;
    let j = id % job.row_pad;
    var key = 0xffffffffu;
    if j < job.row_len {
        let e = element_of(r, j);
        let m = job.models[job.focus];
        let d = load1(m.offset, m.dtype, e) - load1(job.base_offset, job.base_dtype, e);
        key = bitcast<u32>(abs(d));
    }
    dst[2u * id] = key;
    dst[2u * id + 1u] = j;
}

// One compare-exchange step (k, j) of the bitonic network over every row at once.
@compute @workgroup_size(256)
fn bitonic(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = entry_id(wid, nwg, lid);
    let other = id ^ step.j;
    if id >= job.n_entries || other <= id {
        return;
    }
    let ka = dst[2u * id];
    let ia = dst[2u * id + 1u];
    let kb = dst[2u * other];
    let ib = dst[2u * other + 1u];
    let greater = ka > kb || (ka == kb && ia > ib);
    let ascending = ((id % job.row_pad) & step.k) == 0u;
    if greater == ascending {
        dst[2u * id] = kb;
        dst[2u * id + 1u] = ib;
        dst[2u * other] = ka;
        dst[2u * other + 1u] = ia;
    }
}

// Reads the sorted entries (bound as `src`) and writes each element's rank at
// dst[out_offset + element].
@compute @workgroup_size(256)
fn rank_scatter(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = entry_id(wid, nwg, lid);
    if id >= job.n_entries {
        return;
    }
    let p = id % job.row_pad;
    if p >= job.row_len {
        return;
    }
    let r = id / job.row_pad;
    let j = src[2u * id + 1u];
    dst[job.out_offset + element_of(r, j)] = p;
}
