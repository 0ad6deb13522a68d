#!/usr/bin/env python3
"""Generate a Llama-architecture base model and N fine-tunes for benchmarking merges.

    python3 bench/make_models.py OUTDIR --params 640M [--models 3] [--seed 0]

writes OUTDIR/base, OUTDIR/ft1 .. OUTDIR/ftN, each a Hugging Face model folder:

    config.json                              LlamaForCausalLM, tie_word_embeddings false, bf16
    model-00001-of-0000n.safetensors ...     BF16 tensors, sharded (--shard-size, default 1GB)
    model.safetensors.index.json             {"metadata": {"total_size"}, "weight_map"}

and OUTDIR/models.json last (the arguments, shape and parameter count: a stamp that tells
compare_mergekit.sh the folder is complete). No tokenizer is written: run mergekit with
--no-copy-tokenizer; smelt copies none when there is none.

Needs Python 3 and numpy only (no torch). The output depends only on the arguments: the same
arguments give byte-identical files on any machine and any --jobs (little-endian hosts).

Shape: --params picks hidden size, intermediate size (~8/3 hidden, a multiple of 256) and layer
count, vocabulary 32000, head_dim 128, full multi-head attention, so that the parameter count is
close to the request with a usual width/depth ratio (160M -> hidden 768 x 16 layers, 640M ->
hidden 1536 x 19 layers); --hidden/--intermediate/--layers/--vocab/--heads/--kv-heads override.

Values (all computed in f32, stored as bf16 by truncation):
  base       norms 1 + 0.05*N(0,1); embed_tokens/lm_head 0.02*N(0,1); linear N(0,1)/sqrt(fan_in)
  ft_k       base + delta_k, delta_k = s_k * scale * g_k[row] * (0.6*S + O_k) / sqrt(1.36)
             S shared by the fine-tunes (their deltas correlate ~0.26, so TIES' sign election has
             work to do), O_k each one's own, s = 1.0, 0.8, 1.25, 0.9, 1.1, ...; g_k[row] a
             log-normal gain per output row (sigma 0.5: some rows change a lot, most a little);
             scale = 0.05 * the base tensor's init std for matrices, 0.01 for norm weights
             (bf16 steps near 1.0 are 0.0078).
Standard normals come from a pool of 2^24 numpy normals (one per --seed), read at random offsets
per chunk and mixed in pairs by a random rotation (a*p[i] + b*p[j], a^2 + b^2 = 1, still N(0,1)).
That is ~10x faster than drawing fresh normals and, for a merge benchmark, just as good.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

POOL_LOG2 = 24
CHUNK = 1 << 21  # elements per generated chunk (rows are never split)
FT_SCALES = [1.0, 0.8, 1.25, 0.9, 1.1, 0.7, 1.3, 0.95]


def parse_size(s, what):
    s = s.strip().upper().replace("_", "")
    mult = 1
    for suffix, m in (("K", 10**3), ("M", 10**6), ("B", 10**9), ("G", 10**9), ("T", 10**12)):
        if s.endswith(suffix):
            s, mult = s[: -len(suffix)], m
            break
    try:
        v = float(s) * mult
    except ValueError:
        sys.exit(f"make_models.py: cannot read {what} {s!r} (e.g. 640M, 1.5B, 2GB)")
    if v <= 0:
        sys.exit(f"make_models.py: {what} must be positive")
    return int(v)


def parse_bytes(s):
    s = s.strip().upper()
    for suffix, m in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9),
                      ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * m)
    return int(float(s))


def param_count(h, inter, layers, vocab, heads, kv_heads, head_dim):
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    mlp = 3 * h * inter
    return layers * (attn + mlp + 2 * h) + 2 * vocab * h + h


def choose_shape(target, vocab):
    """Hidden (multiple of 256), intermediate ~8/3 hidden (multiple of 256), layers: closest
    parameter count, with a mild preference for hidden/layers ~ 80 (Llama-like proportions)."""
    best = None
    for h in range(256, 16385, 256):
        inter = max(256, int(round(h * 8 / 3 / 256)) * 256)
        heads = max(1, h // 128)
        per_layer = param_count(h, inter, 1, vocab, heads, heads, h // heads) - param_count(
            h, inter, 0, vocab, heads, heads, h // heads)
        fixed = 2 * vocab * h + h
        if fixed >= target:
            continue
        lf = (target - fixed) / per_layer
        for layers in {max(1, math.floor(lf)), max(1, math.ceil(lf))}:
            n = fixed + layers * per_layer
            err = abs(n - target) / target
            score = err + 0.02 * abs(math.log2((h / layers) / 80.0))
            if best is None or score < best[0]:
                best = (score, h, inter, layers)
    if best is None:
        sys.exit(f"make_models.py: {target} parameters is too small for vocabulary {vocab}")
    return best[1], best[2], best[3]


def tensor_list(cfg):
    """(name, shape, kind, fan_in) in the order Hugging Face writes Llama checkpoints."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h), "embed", h)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), "norm", 1),
            (p + "mlp.down_proj.weight", (h, inter), "linear", inter),
            (p + "mlp.gate_proj.weight", (inter, h), "linear", h),
            (p + "mlp.up_proj.weight", (inter, h), "linear", h),
            (p + "post_attention_layernorm.weight", (h,), "norm", 1),
            (p + "self_attn.k_proj.weight", (kv, h), "linear", h),
            (p + "self_attn.o_proj.weight", (h, q), "linear", q),
            (p + "self_attn.q_proj.weight", (q, h), "linear", h),
            (p + "self_attn.v_proj.weight", (kv, h), "linear", h),
        ]
    out += [("model.norm.weight", (h,), "norm", 1), ("lm_head.weight", (v, h), "embed", h)]
    return out


class Gen:
    def __init__(self, seed, n_models):
        self.seed = seed
        self.n = n_models
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5EED])))
        self.pool = rng.standard_normal(1 << POOL_LOG2, dtype=np.float32)

    def _normals(self, rng, m):
        p = self.pool
        a0, a1 = (int(x) for x in rng.integers(0, p.size - m + 1, size=2))
        th = rng.uniform(0.0, 2.0 * math.pi)
        out = p[a0:a0 + m] * np.float32(math.cos(th))
        out += p[a1:a1 + m] * np.float32(math.sin(th))
        return out

    def chunk(self, name, shape, kind, fan_in, r0, r1, tidx):
        """bf16 bytes (as uint16 arrays) of rows r0..r1 of one tensor, for base + n fine-tunes."""
        cols = shape[1] if len(shape) == 2 else shape[0]
        rows = r1 - r0 if len(shape) == 2 else 1
        m = rows * cols
        key = [self.seed, zlib.crc32(name.encode()), tidx, r0]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
        if kind == "norm":
            base = self._normals(rng, m)
            base *= np.float32(0.05)
            base += np.float32(1.0)
            scale = 0.01
        else:
            std = 0.02 if kind == "embed" else 1.0 / math.sqrt(fan_in)
            base = self._normals(rng, m)
            base *= np.float32(std)
            scale = 0.05 * std
        shared = self._normals(rng, m)
        shared *= np.float32(0.6)
        outs = [to_bf16(base)]
        for k in range(self.n):
            # Row gains: a per-(tensor, model) stream, so chunking does not change them.
            grng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                [self.seed, zlib.crc32(name.encode()), tidx, 1000 + k])))
            nrows = shape[0] if len(shape) == 2 else 1
            if len(shape) == 2 and rows < nrows:
                gains = grng.lognormal(0.0, 0.5, size=nrows).astype(np.float32)[r0:r1]
            else:
                gains = grng.lognormal(0.0, 0.5, size=rows).astype(np.float32)
            s = FT_SCALES[k % len(FT_SCALES)] * scale / math.sqrt(1.36)
            d = self._normals(rng, m)
            d += shared
            d = d.reshape(rows, cols)
            d *= (gains * np.float32(s))[:, None]
            d = d.reshape(-1)
            d += base
            outs.append(to_bf16(d))
        return outs


def to_bf16(x):
    """f32 -> bf16 by truncation (the high 16 bits; little-endian)."""
    return np.ascontiguousarray(x.view(np.uint16)[1::2])


def main():
    ap = argparse.ArgumentParser(
        description="Generate a Llama base model and N fine-tunes (bf16, sharded safetensors).")
    ap.add_argument("outdir")
    ap.add_argument("--params", default="640M", help="target parameter count, e.g. 160M, 640M, 1.5B")
    ap.add_argument("--models", type=int, default=3, help="number of fine-tunes (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default="1GB",
                    help="largest shard, e.g. 1GB, 2GB, 500MB (default 1GB, so 640M has 2 shards)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="generator threads (the output does not depend on it)")
    ap.add_argument("--force", action="store_true", help="replace existing model folders")
    a = ap.parse_args()

    if sys.byteorder != "little":
        sys.exit("make_models.py: needs a little-endian host")
    if not 1 <= a.models <= 16:
        sys.exit("make_models.py: --models must be 1..16")
    target = parse_size(a.params, "--params")
    shard_size = parse_bytes(a.shard_size)
    h, inter, layers = choose_shape(target, a.vocab)
    h = a.hidden or h
    if a.hidden and not a.intermediate:
        inter = max(256, int(round(h * 8 / 3 / 256)) * 256)
    inter = a.intermediate or inter
    if a.hidden and not a.layers:
        per = param_count(h, inter, 1, a.vocab, 1, 1, h) - param_count(h, inter, 0, a.vocab, 1, 1, h)
        layers = max(1, round((target - 2 * a.vocab * h - h) / per))
    layers = a.layers or layers
    heads = a.heads or max(1, h // 128)
    if h % heads:
        sys.exit(f"make_models.py: hidden {h} is not divisible by {heads} heads")
    kv_heads = a.kv_heads or heads
    if heads % kv_heads:
        sys.exit(f"make_models.py: {heads} heads are not divisible by {kv_heads} KV heads")
    head_dim = h // heads
    n_params = param_count(h, inter, layers, a.vocab, heads, kv_heads, head_dim)

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": a.vocab,
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "dtype": "bfloat16",
    }
    tensors = tensor_list(cfg)
    assert sum(math.prod(s) for _, s, _, _ in tensors) == n_params

    names = ["base"] + [f"ft{k + 1}" for k in range(a.models)]
    largest = max(tensors, key=lambda t: math.prod(t[1]))
    print(f"make_models.py: {n_params:,} parameters ({n_params / 1e6:.1f}M, requested "
          f"{target / 1e6:.1f}M): hidden {h}, intermediate {inter}, {layers} layers, vocab "
          f"{a.vocab}, {heads} heads ({kv_heads} KV, head_dim {head_dim}); {len(tensors)} tensors, "
          f"largest {largest[0]} {list(largest[1])} ({math.prod(largest[1]):,}); "
          f"{2 * n_params / 1e9:.2f} GB per model in bf16", flush=True)

    # Shards: consecutive tensors, each shard at most shard_size bytes of tensor data.
    shards, cur, cur_bytes = [], [], 0
    for t in tensors:
        nb = 2 * math.prod(t[1])
        if cur and cur_bytes + nb > shard_size:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += nb
    shards.append(cur)
    nsh = len(shards)
    fnames = [f"model-{i + 1:05d}-of-{nsh:05d}.safetensors" for i in range(nsh)]

    os.makedirs(a.outdir, exist_ok=True)
    stamp = os.path.join(a.outdir, "models.json")
    if os.path.exists(stamp):
        os.remove(stamp)
    for n in names:
        d = os.path.join(a.outdir, n)
        if os.path.exists(d):
            if not a.force and os.listdir(d):
                sys.exit(f"make_models.py: {d} exists (use --force to replace it)")
            shutil.rmtree(d)
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        weight_map = {t[0]: fnames[i] for i, sh in enumerate(shards) for t in sh}
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 2 * n_params},
                       "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
            f.write("\n")

    gen = Gen(a.seed, a.models)
    t0 = time.time()
    tidx = {t[0]: i for i, t in enumerate(tensors)}
    pool = ThreadPoolExecutor(max_workers=max(1, a.jobs))
    for si, sh in enumerate(shards):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _, _ in sh:
            nb = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        files = [open(os.path.join(a.outdir, n, fnames[si]), "wb") for n in names]
        for f in files:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
        # Jobs: row ranges of each tensor, generated in parallel, written in order.
        jobs = []
        for name, shape, kind, fan_in in sh:
            nrows = shape[0] if len(shape) == 2 else 1
            cols = shape[1] if len(shape) == 2 else shape[0]
            step = max(1, CHUNK // cols)
            for r0 in range(0, nrows, step):
                jobs.append((name, shape, kind, fan_in, r0, min(nrows, r0 + step), tidx[name]))
        window = 2 * max(1, a.jobs)
        futs = [pool.submit(gen.chunk, *j) for j in jobs[:window]]
        nxt = len(futs)
        for i in range(len(jobs)):
            outs = futs[i].result()
            futs[i] = None
            if nxt < len(jobs):
                futs.append(pool.submit(gen.chunk, *jobs[nxt]))
                nxt += 1
            for f, o in zip(files, outs):
                f.write(memoryview(o))
        for f in files:
            f.close()
        print(f"  shard {si + 1}/{nsh}: {len(sh)} tensors, {off / 1e9:.2f} GB x {len(names)} models "
              f"({time.time() - t0:.1f} s)", flush=True)
    pool.shutdown()

    with open(stamp, "w") as f:
        json.dump({"generator": "bench/make_models.py", "params_requested": a.params,
                   "parameters": n_params, "models": names, "seed": a.seed,
                   "shard_size": shard_size, "shards": nsh,
                   "largest_tensor": {"name": largest[0], "shape": list(largest[1])},
                   "config": cfg}, f, indent=2)
        f.write("\n")
    dt = time.time() - t0
    print(f"make_models.py: wrote {', '.join(names)} under {a.outdir} in {dt:.1f} s "
          f"({len(names) * 2 * n_params / 1e9 / dt:.2f} GB/s written)")


if __name__ == "__main__":
    main()
