// Dtype conversion: the tile's first model, loaded (and rounded to the load dtype) and
// stored in the output dtype. Plain copies that need a conversion use it.

@compute @workgroup_size(256)
fn convert(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = quad_index(wid, nwg, lid);
    if 4u * q >= tile.n {
        return;
    }
    store4(q, load_model4(0u, q));
}
