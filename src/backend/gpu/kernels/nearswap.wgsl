// NearSwap: w = clamp(t / max(|b - x|, 1e-6), 0, 1), out = w·x + (1 - w)·b.
@compute @workgroup_size(256)
fn nearswap(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    if 4u * q >= tile.n {
        return;
    }
    let b = load_base4(q);
    let x = load_model4(0u, q);
    let w = clamp(job.t / max(abs(b - x), vec4<f32>(1e-6)), vec4<f32>(0.0), vec4<f32>(1.0));
    store4(q, w * x + (1.0 - w) * b);
}
