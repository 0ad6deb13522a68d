// The weighted sum (linear): Σ_i w_i·x_i over the models in order from zero, then divided
// by the divisor when one is given. The order of src/backend/cpu.rs's weighted_sum.

@compute @workgroup_size(256)
fn weighted_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
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
