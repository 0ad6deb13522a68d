// The task-arithmetic family (task arithmetic, TIES, DARE, Breadcrumbs) and the weighted
// sum (linear). Arithmetic follows the order of src/backend/cpu.rs exactly:
//   wd_i = ((d_i * keep_i) * scale_i) * w_i,  sums over models in order from zero.

// 1.0 where model `m` keeps an element of the quad whose first global index is `g`.
fn keep4(m: ModelMeta, d: vec4<f32>, g: u32) -> vec4<f32> {
    switch m.keep {
        case 0u: {
            return vec4<f32>(1.0);
        }
        case 1u: {
            return vec4<f32>(0.0);
        }
        case 2u: {
            var k = vec4<f32>(0.0);
            for (var l = 0u; l < 4u; l++) {
                let a = bitcast<u32>(abs(d[l]));
                let idx = g + l;
                let below_hi = a > m.hi_bits || (a == m.hi_bits && idx < m.hi_index);
                let below_lo = a > m.lo_bits || (a == m.lo_bits && idx < m.lo_index);
                k[l] = select(0.0, 1.0, below_hi && !below_lo);
            }
            return k;
        }
        default: {
            let u = to_uniform(rng_block(m.rng_model, g >> 2u));
            return select(vec4<f32>(0.0), vec4<f32>(1.0), u < vec4<f32>(m.p));
        }
    }
}

fn delta4(i: u32, q: u32, b: vec4<f32>) -> vec4<f32> {
    return load_model4(i, q) - b;
}

fn weighted_delta4(i: u32, q: u32, b: vec4<f32>) -> vec4<f32> {
    let m = job.models[i];
    let d = delta4(i, q, b);
    let k = keep4(m, d, tile.start + 4u * q);
    return ((d * k) * m.scale) * m.weight;
}

@compute @workgroup_size(256)
fn gta(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let q = quad_index(wid, lid);
    if 4u * q >= tile.n {
        return;
    }
    let b = load_base4(q);
    var mix = vec4<f32>(0.0);
    var div = vec4<f32>(job.wsum);
    let n = job.n_models;
    if job.consensus == 0u {
        for (var i = 0u; i < n; i++) {
            mix = mix + weighted_delta4(i, q, b);
        }
    } else {
        var vote = vec4<f32>(0.0);
        for (var i = 0u; i < n; i++) {
            let w = weighted_delta4(i, q, b);
            if job.consensus == 1u {
                vote = vote + w;
            } else {
                vote = vote + sgn(w);
            }
        }
        let maj = select(vec4<f32>(-1.0), vec4<f32>(1.0), vote >= vec4<f32>(0.0));
        div = vec4<f32>(0.0);
        for (var i = 0u; i < n; i++) {
            let w = weighted_delta4(i, q, b);
            let agree = select(vec4<f32>(0.0), vec4<f32>(1.0), sgn(w) == maj);
            mix = mix + w * agree;
            div = div + job.models[i].weight * agree;
        }
        div = select(div, vec4<f32>(1.0), div == vec4<f32>(0.0));
    }
    var v = mix;
    if job.normalize == 1u {
        v = v / div;
    }
    if job.lambda != 1.0 {
        v = v * job.lambda;
    }
    store4(q, b + v);
}

@compute @workgroup_size(256)
fn weighted_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let q = quad_index(wid, lid);
    if 4u * q >= tile.n {
        return;
    }
    var acc = vec4<f32>(0.0);
    for (var i = 0u; i < job.n_models; i++) {
        acc = acc + load_model4(i, q) * job.models[i].weight;
    }
    if job.has_divisor == 1u {
        acc = acc / job.divisor;
    }
    store4(q, acc);
}

var<workgroup> red: array<vec2<f32>, 256>;

// Per workgroup and model: (Σ|d|, Σ|d|·keep) as f32 words at
// dst[((tile.wg_base + wg) * n_models + i) * 2 + {0, 1}]; the host adds them up in f64.
@compute @workgroup_size(256)
fn masked_l1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let q = quad_index(wid, lid);
    let inside = 4u * q < tile.n;
    let b = load_base4(q);
    let n = job.n_models;
    for (var i = 0u; i < n; i++) {
        var s = vec2<f32>(0.0);
        if inside {
            let m = job.models[i];
            let d = delta4(i, q, b);
            let k = keep4(m, d, tile.start + 4u * q);
            for (var l = 0u; l < 4u; l++) {
                if 4u * q + l < tile.n {
                    let a = abs(d[l]);
                    s = s + vec2<f32>(a, a * k[l]);
                }
            }
        }
        red[lid] = s;
        workgroupBarrier();
        for (var w = WG / 2u; w > 0u; w = w / 2u) {
            if lid < w {
                red[lid] = red[lid] + red[lid + w];
            }
            workgroupBarrier();
        }
        if lid == 0u {
            let o = ((tile.wg_base + wg_linear(wid)) * n + i) * 2u;
            dst[o] = bitcast<u32>(red[0].x);
            dst[o + 1u] = bitcast<u32>(red[0].y);
        }
        workgroupBarrier();
    }
}
