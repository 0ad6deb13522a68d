// Output binding and packing for kernels that write a tensor: f32 as is, f16/bf16 rounded
// to nearest even and packed two to a word. Only elements inside the tile are written.

@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

fn pack(x: f32, dt: u32) -> u32 {
    if dt == 2u {
        return f32_to_bf16(x);
    }
    return f32_to_f16(x);
}

fn store4(q: u32, v: vec4<f32>) {
    let e = 4u * q;
    let dt = job.out_dtype;
    if dt == 0u {
        for (var l = 0u; l < 4u; l++) {
            if e + l < tile.n {
                dst[e + l] = bitcast<u32>(v[l]);
            }
        }
    } else {
        dst[2u * q] = pack(v.x, dt) | (pack(v.y, dt) << 16u);
        if e + 2u < tile.n {
            dst[2u * q + 1u] = pack(v.z, dt) | (pack(v.w, dt) << 16u);
        }
    }
}
