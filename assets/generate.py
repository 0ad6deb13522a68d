#!/usr/bin/env python3
"""Generate smelt's bundled example models: a tiny Llama base and three fine-tunes of it.

usage:  python3 assets/generate.py            (writes assets/models/{base,math,code,chat})
        python3 assets/generate.py --out DIR  (writes DIR/{base,math,code,chat} instead)

Needs Python 3 and numpy only. The safetensors files are written by hand (8-byte little-endian
header length, JSON header, raw little-endian data), so torch and the `safetensors` package are
not needed. The output is a pure function of SEED: running the script twice gives byte-identical
files (numpy's PCG64 streams and its normal sampler have been stable since numpy 1.17).

The weights are random: nothing here was trained, and the names say which part of the network
each "fine-tune" moved most, not what it can do. They exist so that `smelt merge` has something
real-shaped to chew on: the same tensor names, shapes, dtype (bf16), sharding, config and tokenizer
files as a Hugging Face Llama checkpoint, at 180k parameters instead of billions.

How the fine-tunes are built, per tensor W of the base (all arithmetic in float64, then rounded
once to bf16):
    ft_k = bf16(W + delta_k)
    delta_k = scale(W) * emphasis_k(W) * (A * S + B * O_k) / sqrt(A^2 + B^2)
S is one standard-normal tensor shared by all three fine-tunes (the common direction of "being
fine-tuned on anything"), O_k is each fine-tune's own standard-normal tensor. With A = 0.6 and
B = 1.0 two fine-tunes' deltas correlate at 0.26, so their signs disagree on about 40% of the
elements: TIES and DARE-TIES have real sign conflicts to resolve. scale(W) is 10% of the RMS of W
for matrices and an absolute 0.03 for the RMSNorm weights (large enough to survive bf16's 2^-7
spacing near 1.0). emphasis_k scales the delta up or down by module so that the three fine-tunes
differ in where they moved the network:
    math: MLP x1.6 (and growing with depth), attention x0.6
    code: attention x1.6, MLP x0.7
    chat: embeddings and lm_head x1.8, norms x1.5, attention and MLP x0.8
"""
import argparse
import json
import math
import os
import struct

import numpy as np

SEED = 20260214

CONFIG = {
    "hidden": 64,
    "intermediate": 128,
    "layers": 4,
    "vocab": 256,
    "heads": 4,
    "kv_heads": 2,
}

SHARED_A = 0.6  # weight of the shared component S
OWN_B = 1.0  # weight of each fine-tune's own component O_k
REL_SCALE = 0.10  # delta RMS relative to the tensor's RMS (matrices)
NORM_SCALE = 0.03  # delta RMS of the RMSNorm weights (absolute)

# Where each fine-tune moved the network most (see the module docstring).
FINETUNES = ["math", "code", "chat"]
EMPHASIS = {
    "math": {"mlp": 1.6, "self_attn": 0.6, "embed": 1.0, "norm": 1.0},
    "code": {"mlp": 0.7, "self_attn": 1.6, "embed": 1.0, "norm": 1.0},
    "chat": {"mlp": 0.8, "self_attn": 0.8, "embed": 1.8, "norm": 1.5},
}

# How each model folder stores its weights: one file, or shards (lists of tensor-name
# predicates, one per shard file). "code" is sharded so that smelt's index reader is exercised.
SHARDING = {
    "base": None,
    "math": None,
    "code": [
        lambda n: n.startswith("model.embed_tokens") or layer_of(n) in (0, 1),
        lambda n: not (n.startswith("model.embed_tokens") or layer_of(n) in (0, 1)),
    ],
    "chat": None,
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
UNK, BOS, EOS, PAD = range(4)

# The word-level vocabulary, filled up to exactly `vocab` tokens: specials, digits, letters,
# punctuation, then words a math, a code and a chat model would all see.
PUNCT = list(".,:;!?'\"()[]{}<>+-*/=%&|^~#@$_\\")
WORDS = """
the a an and or not of to in on at for with from by is are was be it this that as if then else
i you we they he she my your our what which who how why when where yes no please thanks hello hi
can could would should will do does did have has had make use get give take see know think want
need help like good bad more less new old first last next number numbers value values sum product
add subtract multiply divide equals plus minus times over half twice zero one two three four five
six seven eight nine ten hundred thousand prime even odd square root power answer solve prove
proof equation variable function result step total count list set map array string int float bool
true false none null def return class import print while loop break continue try except raise
lambda self let var const fn struct impl pub use mod match type error file line code test run
build user assistant system question reply chat text word words model data time day
write read story example because about all some
""".split()


def layer_of(name):
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return int(parts[2])
    return None


# ------------------------------------------------------------------------------------ weights
def tensor_specs(c):
    h, inter = c["hidden"], c["intermediate"]
    kv = c["kv_heads"] * (h // c["heads"])
    specs = [("model.embed_tokens.weight", (c["vocab"], h))]
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab"], h))]
    return specs


def module_of(name):
    if "embed_tokens" in name or "lm_head" in name:
        return "embed"
    if name.endswith("norm.weight"):
        return "norm"
    if ".mlp." in name:
        return "mlp"
    return "self_attn"


def to_bf16_bits(x):
    """float64/float32 array -> uint16 bf16 bit patterns, round to nearest, ties to even."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(f).all():
        raise ValueError("non-finite weight")
    u = f.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def make_weights(c):
    """Returns {model name: {tensor name: uint16 bf16 array}}."""
    out = {m: {} for m in ["base"] + FINETUNES}
    layers = c["layers"]
    for idx, (name, shape) in enumerate(tensor_specs(c)):
        rng = np.random.default_rng(np.random.SeedSequence([SEED, idx]))
        z = rng.standard_normal(shape)
        kind = module_of(name)
        if kind == "norm":
            w = 1.0 + 0.05 * z
        elif name.startswith("model.embed_tokens"):
            w = 0.25 * z
        else:
            w = z / math.sqrt(shape[1])  # fan-in scaling: activations and logits stay O(1)
        base_bits = to_bf16_bits(w)
        base = from_bf16_bits(base_bits)  # fine-tunes start from the stored (rounded) base
        out["base"][name] = base_bits
        scale = NORM_SCALE if kind == "norm" else REL_SCALE * float(np.sqrt(np.mean(base**2)))
        shared = rng.standard_normal(shape)
        layer = layer_of(name)
        depth = layer / (layers - 1) if layer is not None else 0.5
        for ft in FINETUNES:
            own = rng.standard_normal(shape)
            emph = EMPHASIS[ft][kind]
            if ft == "math" and kind == "mlp":
                emph *= 0.75 + 0.5 * depth  # math moved the deeper MLPs most
            delta = scale * emph * (SHARED_A * shared + OWN_B * own) / math.hypot(SHARED_A, OWN_B)
            out[ft][name] = to_bf16_bits(base + delta)
    return out


# --------------------------------------------------------------------------------- safetensors
def safetensors_bytes(tensors, shapes):
    """tensors: {name: uint16 bf16 bits} in the order they are laid out."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, bits in tensors.items():
        n = bits.size * 2
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-(len(text) + 8) % 8)  # data starts 8-byte aligned, as the safetensors writer does
    data = b"".join(np.ascontiguousarray(b, dtype="<u2").tobytes() for b in tensors.values())
    return struct.pack("<Q", len(text)) + text.encode() + data


def write_model(d, tensors, shapes, sharding):
    os.makedirs(d, exist_ok=True)
    names = sorted(tensors)
    if sharding is None:
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(safetensors_bytes({n: tensors[n] for n in names}, shapes))
        return
    n_shards = len(sharding)
    weight_map = {}
    total = 0
    for i, pick in enumerate(sharding):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names if pick(n)}
        with open(os.path.join(d, fname), "wb") as f:
            f.write(safetensors_bytes(part, shapes))
        for n, b in part.items():
            weight_map[n] = fname
            total += b.size * 2
    if sorted(weight_map) != names:
        raise AssertionError("shards must hold every tensor exactly once")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(os.path.join(d, "model.safetensors.index.json"), index)


# ----------------------------------------------------------------------------- json side files
def write_json(path, obj):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def llama_config(c):
    h, heads = c["hidden"], c["heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c["vocab"],
        "hidden_size": h,
        "intermediate_size": c["intermediate"],
        "num_hidden_layers": c["layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": c["kv_heads"],
        "head_dim": h // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def generation_config():
    return {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "max_length": 256, "do_sample": False}


def vocabulary(size):
    tokens = SPECIAL_TOKENS + [str(d) for d in range(10)] + [chr(ord("a") + i) for i in range(26)] + PUNCT
    for w in WORDS:
        if len(tokens) == size:
            break
        if w not in tokens:
            tokens.append(w)
    if len(tokens) != size or len(set(tokens)) != size:
        raise AssertionError(f"vocabulary has {len(tokens)} distinct tokens, wanted {size}")
    return tokens


def tokenizer_files(size):
    """tokenizer.json (a `tokenizers` WordLevel model), tokenizer_config.json, special_tokens_map.json."""
    tokens = vocabulary(size)
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    ]
    bos = {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        # split on whitespace, then every punctuation character and digit is a token of its own:
        # "add(a, b): return 12" -> add ( a , b ) : return 1 2
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Punctuation", "behavior": "Isolated"},
            {"type": "Digits", "individual_digits": True},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": bos,
        },
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": "<unk>"},
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for a in added
        },
    }
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return {"tokenizer.json": tok, "tokenizer_config.json": cfg, "special_tokens_map.json": special}


# ------------------------------------------------------------------------------------------ main
def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(here, "models"), help="folder for the model folders")
    args = ap.parse_args()

    c = CONFIG
    shapes = dict(tensor_specs(c))
    weights = make_weights(c)
    cfg = llama_config(c)
    for model, tensors in weights.items():
        d = os.path.join(args.out, model)
        if os.path.isdir(d):
            for f in os.listdir(d):  # drop files of an older layout (e.g. shards -> one file)
                os.remove(os.path.join(d, f))
        write_model(d, tensors, shapes, SHARDING[model])
        write_json(os.path.join(d, "config.json"), cfg)
        write_json(os.path.join(d, "generation_config.json"), generation_config())
        if model == "base":
            for fname, obj in tokenizer_files(c["vocab"]).items():
                write_json(os.path.join(d, fname), obj)
        files = sorted(os.listdir(d))
        size = sum(os.path.getsize(os.path.join(d, f)) for f in files)
        print(f"{d}: {len(tensors)} tensors, {size / 1024:.0f} KiB ({', '.join(files)})")
    base = {k: from_bf16_bits(v) for k, v in weights["base"].items()}
    n = sum(v.size for v in base.values())
    print(f"{n} parameters per model")
    # How much the fine-tunes disagree: the fraction of elements where two deltas have opposite signs.
    for i, a in enumerate(FINETUNES):
        for b in FINETUNES[i + 1:]:
            da = np.concatenate([(from_bf16_bits(weights[a][k]) - base[k]).ravel() for k in base])
            db = np.concatenate([(from_bf16_bits(weights[b][k]) - base[k]).ravel() for k in base])
            both = (da != 0) & (db != 0)
            print(f"  {a}/{b}: signs disagree on {np.mean(np.sign(da[both]) != np.sign(db[both])):.0%} "
                  f"of the elements both changed; unchanged by bf16 rounding: {np.mean(da == 0):.1%}/{np.mean(db == 0):.1%}")


if __name__ == "__main__":
    main()
