// tanh as src/backend/fused.rs::pcb_tanh: a series below 0.1 (no cancellation for the tiny
// products PCB feeds it), the exponential form above.
fn pcb_tanh(x: f32) -> f32 {
    let a = abs(x);
    if a < 0.1 {
        let x2 = x * x;
        return x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))));
    }
    let e = exp(-2.0 * a);
    let t = (1.0 - e) / (1.0 + e);
    return select(t, -t, x < 0.0);
}

// PCB-merging (src/backend/fused.rs::PcbSpec): per model lo = lo_bits, hi = hi_bits,
// q = lo_index, bmax = hi_index (f32 bits), weight. n_items = 1: write β of model `focus`.
@compute @workgroup_size(256)
fn pcb(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    if 4u * q >= tile.n {
        return;
    }
    let b = load_base4(q);
    let m = job.n_models;
    let n = f32(m);
    var sum = vec4<f32>(0.0);
    for (var i = 0u; i < m; i++) {
        sum = sum + delta4(i, q, b);
    }
    var num = vec4<f32>(0.0);
    var den = vec4<f32>(0.0);
    for (var i = 0u; i < m; i++) {
        let mm = job.models[i];
        let lo = bitcast<f32>(mm.lo_bits);
        let hi = bitcast<f32>(mm.hi_bits);
        let qq = bitcast<f32>(mm.lo_index);
        let bmax = bitcast<f32>(mm.hi_index);
        let t = delta4(i, q, b);
        let a = clamp(abs(t), vec4<f32>(lo), vec4<f32>(hi));
        let r = (a - lo) / (hi - lo);
        let p = t * sum;
        let beta = exp(n * (r * r)) * vec4<f32>(pcb_tanh(p.x), pcb_tanh(p.y), pcb_tanh(p.z), pcb_tanh(p.w));
        if job.n_items == 1u && job.focus == i {
            num = beta;
            break;
        }
        let sc = (clamp(beta, vec4<f32>(qq), vec4<f32>(bmax)) - qq) / (bmax - qq);
        num = num + mm.weight * (sgn(t) * a) * sc;
        den = den + sc;
    }
    if job.n_items == 1u {
        store4(q, num);
    } else {
        store4(q, b + num / max(den, vec4<f32>(1e-12)));
    }
}
