// Fisher-weighted average: M = n_items models, models[M + i] is the diagonal Fisher of
// models[i]; w_i = weight_i·(F_i + t), out = Σ w_i·θ_i / Σ w_i, sums in model order.
@compute @workgroup_size(256)
fn fisher(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    if 4u * q >= tile.n {
        return;
    }
    let m = job.n_items;
    var num = vec4<f32>(0.0);
    var den = vec4<f32>(0.0);
    for (var i = 0u; i < m; i++) {
        let w = job.models[i].weight * (load_model4(m + i, q) + job.t);
        num = num + w * load_model4(i, q);
        den = den + w;
    }
    store4(q, num / den);
}
