// ComPEFT: sign(d) where |d| >= the threshold (job.t, compared as f32 bits), else 0;
// d = models[0] - base. sgn gives 0 for d = 0 (and NaN), as the CPU path.
@compute @workgroup_size(256)
fn ternary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    if 4u * q >= tile.n {
        return;
    }
    let d = load_model4(0u, q) - load_base4(q);
    let kept = bitcast<vec4<u32>>(abs(d)) >= vec4<u32>(bitcast<u32>(job.t));
    store4(q, select(vec4<f32>(0.0), sgn(d), kept));
}
