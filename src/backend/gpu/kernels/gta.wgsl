// The task-arithmetic family (task arithmetic, TIES, DARE, Breadcrumbs, DELLA, SCE): the
// combine and its masked sums. Arithmetic follows the order of src/backend/cpu.rs exactly:
//   u_i = (d_i * keep_i) * scale_i,  wd_i = u_i * w_i,  sums over models in order from zero.

// 1.0 where the random word's top 24 bits are below the threshold of each lane.
fn random_keep(m: ModelMeta, g: u32, thr: vec4<u32>) -> vec4<f32> {
    let r = rng_block(m.rng_model, g >> 2u);
    return select(vec4<f32>(0.0), vec4<f32>(1.0), (r >> vec4<u32>(8u)) < thr);
}

// 1.0 where model `m` keeps an element of quad q, whose first global index is `g`.
fn keep4(m: ModelMeta, d: vec4<f32>, var_key: vec4<f32>, q: u32, g: u32) -> vec4<f32> {
    switch m.keep {
        case 0u: {
            return vec4<f32>(1.0);
        }
        case 1u: {
            return vec4<f32>(0.0);
        }
        case 2u, 4u: {
            var key = abs(d);
            if m.keep == 4u {
                key = abs(var_key);
            }
            var k = vec4<f32>(0.0);
            for (var l = 0u; l < 4u; l++) {
                let a = bitcast<u32>(key[l]);
                let idx = g + l;
                let below_hi = a > m.hi_bits || (a == m.hi_bits && idx < m.hi_index);
                let below_lo = a > m.lo_bits || (a == m.lo_bits && idx < m.lo_index);
                k[l] = select(0.0, 1.0, below_hi && !below_lo);
            }
            return k;
        }
        case 3u: {
            return random_keep(m, g, vec4<u32>(m.thr));
        }
        default: {
            // DELLA: the threshold of each lane's rank within its row
            var thr = vec4<u32>(0u);
            for (var l = 0u; l < 4u; l++) {
                let e = min(4u * q + l, tile.n - 1u);
                thr[l] = aux[m.table + aux[m.ranks + e]];
            }
            return random_keep(m, g, thr);
        }
    }
}

fn var_key4(q: u32, b: vec4<f32>) -> vec4<f32> {
    if job.use_var == 1u {
        return variance4(q, b);
    }
    return vec4<f32>(0.0);
}

// (u_i, wd_i) of model i over quad q.
fn contribution4(i: u32, q: u32, b: vec4<f32>, vk: vec4<f32>) -> array<vec4<f32>, 2> {
    let m = job.models[i];
    let d = delta4(i, q, b);
    let k = keep4(m, d, vk, q, tile.start + 4u * q);
    let u = (d * k) * m.scale;
    return array<vec4<f32>, 2>(u, u * m.weight);
}

@compute @workgroup_size(256)
fn gta(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    if 4u * q >= tile.n {
        return;
    }
    let b = load_base4(q);
    let vk = var_key4(q, b);
    var mix = vec4<f32>(0.0);
    var div = vec4<f32>(job.wsum);
    let n = job.n_models;
    if job.consensus == 0u {
        for (var i = 0u; i < n; i++) {
            mix = mix + contribution4(i, q, b, vk)[1];
        }
    } else {
        var vote = vec4<f32>(0.0);
        for (var i = 0u; i < n; i++) {
            let c = contribution4(i, q, b, vk);
            let v = select(c[1], c[0], job.vote == 1u);
            if job.consensus == 1u {
                vote = vote + v;
            } else {
                vote = vote + sgn(v);
            }
        }
        let maj = select(vec4<f32>(-1.0), vec4<f32>(1.0), vote >= vec4<f32>(0.0));
        div = vec4<f32>(0.0);
        for (var i = 0u; i < n; i++) {
            let w = contribution4(i, q, b, vk)[1];
            let agree = select(vec4<f32>(0.0), vec4<f32>(1.0), sgn(w) == maj);
            mix = mix + w * agree;
            div = div + job.models[i].weight * agree;
        }
        if job.floor_on == 1u {
            div = max(div, vec4<f32>(job.div_floor));
        } else {
            div = select(div, vec4<f32>(1.0), div == vec4<f32>(0.0));
        }
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

var<workgroup> red: array<vec3<f32>, 256>;

// Per workgroup and model: (Σ|d|, Σ|d|·keep, Σ(d·keep)²) as f32 words at
// dst[((tile.wg_base + wg) * n_models + i) * 3 + {0, 1, 2}]; the host adds them up in f64.
@compute @workgroup_size(256)
fn masked_sums(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    let inside = 4u * q < tile.n;
    var b = vec4<f32>(0.0);
    var vk = vec4<f32>(0.0);
    if inside {
        b = load_base4(q);
        vk = var_key4(q, b);
    }
    let n = job.n_models;
    for (var i = 0u; i < n; i++) {
        var s = vec3<f32>(0.0);
        if inside {
            let m = job.models[i];
            let d = delta4(i, q, b);
            let k = keep4(m, d, vk, q, tile.start + 4u * q);
            for (var l = 0u; l < 4u; l++) {
                if 4u * q + l < tile.n {
                    let a = abs(d[l]);
                    let kd = d[l] * k[l];
                    s = s + vec3<f32>(a, a * k[l], kd * kd);
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
            let o = ((tile.wg_base + wg_linear(wid, nwg)) * n + i) * 3u;
            dst[o] = bitcast<u32>(red[0].x);
            dst[o + 1u] = bitcast<u32>(red[0].y);
            dst[o + 2u] = bitcast<u32>(red[0].z);
        }
        workgroupBarrier();
    }
}
