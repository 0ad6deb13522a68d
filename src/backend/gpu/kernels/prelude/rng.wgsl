// Philox4x32-10 from 32-bit operations only, bit-identical to src/rng.rs.
// Counter (element block, 0, tensor-name hash, model index), key = the 64-bit seed.

fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let ah = a >> 16u;
    let al = a & 0xffffu;
    let bh = b >> 16u;
    let bl = b & 0xffffu;
    let ll = al * bl;
    let lh = al * bh;
    let hl = ah * bl;
    let hh = ah * bh;
    let mid = (ll >> 16u) + (lh & 0xffffu) + (hl & 0xffffu);
    let lo = (mid << 16u) | (ll & 0xffffu);
    let hi = hh + (lh >> 16u) + (hl >> 16u) + (mid >> 16u);
    return vec2<u32>(hi, lo);
}

fn philox4x32_10(counter: vec4<u32>, key_in: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key_in;
    for (var r = 0u; r < 10u; r++) {
        if r > 0u {
            k = k + vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let p0 = mulhilo(0xD2511F53u, c.x);
        let p1 = mulhilo(0xCD9E8D57u, c.z);
        c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
    }
    return c;
}

// Random words of elements 4*block .. 4*block+3 of the stream of `model`.
fn rng_block(model: u32, block: u32) -> vec4<u32> {
    return philox4x32_10(vec4<u32>(block, 0u, job.name_hash, model), vec2<u32>(job.seed_lo, job.seed_hi));
}

fn to_uniform(x: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(x >> vec4<u32>(8u)) * (1.0 / 16777216.0);
}
