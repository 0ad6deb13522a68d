// Shared by every smelt kernel (prepended to each kernel family's source):
// the packed-input binding, per-operation metadata, dtype unpacking and packing, and
// 2-D dispatch indexing.
//
// One tile of a job is uploaded as its raw little-endian bytes, every input (the base and
// the models) in its own segment of `src`. Nothing is unpacked ahead of time: kernels read
// f32, f16 or bf16 words and convert as they load. Each invocation handles one quad: four
// consecutive elements, so that a quad of 16-bit outputs is exactly two u32 words and one
// Philox call gives the quad's four random numbers.

struct ModelMeta {
    offset: u32,     // word offset of this input's segment in `src`
    dtype: u32,      // 0 f32, 1 f16, 2 bf16
    keep: u32,       // 0 all, 1 nothing, 2 rank band by |delta|, 3 random, 4 rank band by
                     // variance, 5 DELLA (random against a threshold table indexed by rank)
    rng_model: u32,  // model index keying the random stream | vector entries: the model
    lo_bits: u32,    // rank band: lower cut (excluded) | select: filter bucket
    lo_index: u32,
    hi_bits: u32,    // rank band: upper cut | count_equal: the key counted
    hi_index: u32,
    thr: u32,        // random keep: kept when the word's top 24 bits are below this
    weight: f32,
    scale: f32,
    aux: u32,        // select: bit 0 key |x|, bit 1 filtered, bit 2 key = variance |
                     // vector entries: 0 model, 1 base, 2 delta, 3 ones
    ranks: u32,      // DELLA: word offset of this model's per-element ranks in `aux`
    table: u32,      // DELLA: word offset of its threshold table in `aux`
    _p0: u32,
    _p1: u32,
}

struct Meta {
    n_models: u32,     // the real models (sources and vectors follow them in `models`)
    base_offset: u32,
    base_dtype: u32,
    load_dtype: u32,   // inputs are rounded to this dtype as they load (0 = exact)
    out_dtype: u32,
    consensus: u32,    // 0 none, 1 sum, 2 count
    normalize: u32,
    lambda: f32,
    wsum: f32,         // divisor without consensus
    seed_lo: u32,
    seed_hi: u32,
    name_hash: u32,
    has_divisor: u32,
    divisor: f32,
    focus: u32,        // equal_bits: the workgroup whose mask is wanted | rank kernels: model
    vote: u32,         // 0 weighted deltas vote, 1 unweighted
    floor_on: u32,     // divisor: 0 -> 1 (off), or max(divisor, div_floor) (on)
    div_floor: f32,
    inv_m: f32,        // 1 / n_models, for the variance key
    use_var: u32,      // some keep rule ranks by variance
    seg_kind: u32,     // 0 whole, 1 rows of seg_len, 2 columns (seg_len = number of columns)
    seg_len: u32,
    n_items: u32,      // sources, vectors or terms after the models
    n_pairs: u32,
    t: f32,            // nearswap
    row_len: u32,      // rank kernels: row length, slab inner count, padded length P
    row_inner: u32,
    row_pad: u32,
    n_entries: u32,    // rank kernels: rows x row_pad sort entries in this tile
    out_offset: u32,   // rank_scatter: word offset of the ranks in `dst`
    _p2: u32,
    _p3: u32,
    models: array<ModelMeta>,
}

struct Tile {
    n: u32,          // elements in this tile
    start: u32,      // global index of the tile's first element
    _g: u32,
    wg_base: u32,    // index of this tile's first workgroup within the whole job
    index: u32,      // which tile of the job this is
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read> job: Meta;
@group(0) @binding(3) var<uniform> tile: Tile;
// Per-operation extra data: DELLA ranks and threshold tables, combine coefficients,
// dot-product pairs. Bound to a dummy buffer when an operation has none.
@group(0) @binding(4) var<storage, read> aux: array<u32>;

const WG: u32 = 256u;

// Workgroup number in a 2-D dispatch (past 65,535 groups the grid wraps into y).
fn wg_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

fn quad_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return wg_linear(wid, nwg) * WG + lid;
}

// ---- dtype conversions: the same integer recipes as src/dtype.rs ----

fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0u {
        return bitcast<f32>(bitcast<u32>(f32(m) * 5.9604644775390625e-8) | sign);
    }
    if e == 31u {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn f32_to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn f32_to_f16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    var h: u32;
    if a >= 0x7f800000u {
        h = select(0x7c00u, 0x7e00u | ((a >> 13u) & 0x3ffu), a > 0x7f800000u);
    } else if a >= 0x477ff000u {
        h = 0x7c00u;
    } else if a >= 0x38800000u {
        let v = a - 0x38000000u;
        h = (v + 0x0fffu + ((v >> 13u) & 1u)) >> 13u;
    } else if a <= 0x33000000u {
        h = 0u;
    } else {
        let e = a >> 23u;
        let m = (a & 0x7fffffu) | 0x800000u;
        let s = 126u - e;
        let k = m >> s;
        let rem = m & ((1u << s) - 1u);
        let half = 1u << (s - 1u);
        h = k + select(0u, 1u, rem > half || (rem == half && (k & 1u) == 1u));
    }
    return sign | h;
}

fn quantize(x: f32, dt: u32) -> f32 {
    if dt == 2u {
        return bf16_to_f32(f32_to_bf16(x));
    }
    if dt == 1u {
        return f16_to_f32(f32_to_f16(x));
    }
    return x;
}

// The four elements of quad `q` of the segment at `offset`. Elements past the tile's end
// read padding; callers never store or count them.
fn load4(offset: u32, dtype: u32, q: u32) -> vec4<f32> {
    var v: vec4<f32>;
    if dtype == 0u {
        let i = offset + 4u * q;
        v = vec4<f32>(bitcast<f32>(src[i]), bitcast<f32>(src[i + 1u]), bitcast<f32>(src[i + 2u]), bitcast<f32>(src[i + 3u]));
    } else {
        let w0 = src[offset + 2u * q];
        let w1 = src[offset + 2u * q + 1u];
        if dtype == 2u {
            v = vec4<f32>(bf16_to_f32(w0 & 0xffffu), bf16_to_f32(w0 >> 16u), bf16_to_f32(w1 & 0xffffu), bf16_to_f32(w1 >> 16u));
        } else {
            v = vec4<f32>(f16_to_f32(w0 & 0xffffu), f16_to_f32(w0 >> 16u), f16_to_f32(w1 & 0xffffu), f16_to_f32(w1 >> 16u));
        }
    }
    let ld = job.load_dtype;
    if ld != 0u && ld != dtype {
        v = vec4<f32>(quantize(v.x, ld), quantize(v.y, ld), quantize(v.z, ld), quantize(v.w, ld));
    }
    return v;
}

// One element `e` of the segment at `offset`.
fn load1(offset: u32, dtype: u32, e: u32) -> f32 {
    var v: f32;
    if dtype == 0u {
        v = bitcast<f32>(src[offset + e]);
    } else {
        let w = src[offset + e / 2u];
        let h = select(w & 0xffffu, w >> 16u, (e & 1u) == 1u);
        v = select(f16_to_f32(h), bf16_to_f32(h), dtype == 2u);
    }
    let ld = job.load_dtype;
    if ld != 0u && ld != dtype {
        v = quantize(v, ld);
    }
    return v;
}

fn load_base4(q: u32) -> vec4<f32> {
    return load4(job.base_offset, job.base_dtype, q);
}

fn load_model4(i: u32, q: u32) -> vec4<f32> {
    let m = job.models[i];
    return load4(m.offset, m.dtype, q);
}

fn delta4(i: u32, q: u32, b: vec4<f32>) -> vec4<f32> {
    return load_model4(i, q) - b;
}

// Σ_i (d_i - m)² with m = (Σ_i d_i)·(1/M), the order of src/backend/cpu.rs::variance_keys.
fn variance4(q: u32, b: vec4<f32>) -> vec4<f32> {
    var m = vec4<f32>(0.0);
    for (var i = 0u; i < job.n_models; i++) {
        m = m + delta4(i, q, b);
    }
    m = m * job.inv_m;
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < job.n_models; i++) {
        let e = delta4(i, q, b) - m;
        v = v + e * e;
    }
    return v;
}

// The value of vector entry `v` at element `e`.
fn vector1(v: ModelMeta, e: u32) -> f32 {
    if v.aux == 3u {
        return 1.0;
    }
    let b = load1(job.base_offset, job.base_dtype, e);
    if v.aux == 1u {
        return b;
    }
    let m = job.models[v.rng_model];
    let x = load1(m.offset, m.dtype, e);
    if v.aux == 2u {
        return x - b;
    }
    return x;
}

// The values of vector entry `e` (model, base or delta) over quad q.
fn vector4(e: ModelMeta, q: u32) -> vec4<f32> {
    if e.aux == 3u {
        return vec4<f32>(1.0);
    }
    if e.aux == 1u {
        return load_base4(q);
    }
    let x = load_model4(e.rng_model, q);
    if e.aux == 2u {
        return x - load_base4(q);
    }
    return x;
}

// Sign as torch computes it, 0 for both zeros (and, like the CPU path, for NaN).
fn sgn(x: vec4<f32>) -> vec4<f32> {
    let neg = select(vec4<f32>(0.0), vec4<f32>(-1.0), x < vec4<f32>(0.0));
    return select(neg, vec4<f32>(1.0), x > vec4<f32>(0.0));
}
