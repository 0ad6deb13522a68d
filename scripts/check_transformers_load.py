#!/usr/bin/env python3
"""Check that folders written by `smelt merge` load in Hugging Face transformers and run.

usage:
    python scripts/check_transformers_load.py OUT_DIR [OUT_DIR ...]

    e.g.  smelt merge assets/recipes/ties.yml -o /tmp/merged-ties
          python scripts/check_transformers_load.py /tmp/merged-ties

Needs torch, transformers and safetensors (CPU builds are enough):
    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install torch transformers safetensors
    (torch CPU wheels: --index-url https://download.pytorch.org/whl/cpu)
Not run in CI, which has no torch.

For each folder it
  1. loads the model with AutoModelForCausalLM.from_pretrained in float32 and fails on any missing,
     unexpected or mismatched tensor (transformers would otherwise only warn and initialise
     them randomly);
  2. checks config.json against the weights: the number of layers, vocab_size against the
     embedding rows, and that the dtype the model loaded in is the config's dtype;
  3. reads every tensor with the `safetensors` package (single file or index + shards) and
     compares it bit for bit with the loaded parameter;
  4. loads the tokenizer with AutoTokenizer.from_pretrained, encodes a sentence and checks its
     ids are below vocab_size;
  5. runs a forward pass on a few token ids, in float32 and in the config's dtype, and checks the
     logits' shape, that they are finite, and that the two agree roughly;
  6. if a generation_config.json is present, loads it with GenerationConfig.from_pretrained.
Prints one line per folder and exits with status 1 if any check failed.
"""
import json
import os
import sys
import traceback


def check(out):
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    cfg = AutoConfig.from_pretrained(out)
    try:  # `dtype` since transformers 4.56, `torch_dtype` before
        model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    except TypeError:
        model, info = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise AssertionError(f"loading info reports problems: {problems}")

    with open(os.path.join(out, "config.json")) as f:
        raw_cfg = json.load(f)
    want_dtype = raw_cfg.get("dtype") or raw_cfg.get("torch_dtype")
    # Load again as config.json says (transformers 5 does this by default, 4.x in float32).
    try:
        auto = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    except TypeError:
        auto = AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto")
    got_dtype = str(next(auto.parameters()).dtype).replace("torch.", "")
    if want_dtype and got_dtype != want_dtype:
        raise AssertionError(f"config says dtype {want_dtype}, dtype='auto' loaded {got_dtype}")

    # Every stored tensor, bit for bit, against the loaded parameters.
    idx = os.path.join(out, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            index = json.load(f)
        files = sorted(set(index["weight_map"].values()))
        total = 0
    else:
        index, files = None, ["model.safetensors"]
    state = auto.state_dict()
    n_tensors = 0
    stored_dtypes = set()
    for fname in files:
        with safe_open(os.path.join(out, fname), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                stored_dtypes.add(str(t.dtype).replace("torch.", ""))
                n_tensors += 1
                if index is not None:
                    if index["weight_map"].get(name) != fname:
                        raise AssertionError(f"index puts {name} in {index['weight_map'].get(name)}, found in {fname}")
                    total += t.numel() * t.element_size()
                p = state[name]
                if p.shape != t.shape or not torch.equal(p.to(t.dtype), t):
                    raise AssertionError(f"{name}: loaded parameter differs from the stored tensor")
                if not torch.isfinite(t.float()).all():
                    raise AssertionError(f"{name}: stored tensor has non-finite values")
    if index is not None:
        if n_tensors != len(index["weight_map"]):
            raise AssertionError(f"index lists {len(index['weight_map'])} tensors, shards hold {n_tensors}")
        if index.get("metadata", {}).get("total_size") != total:
            raise AssertionError(f"index total_size {index.get('metadata', {}).get('total_size')} != {total}")

    n_layers = len(model.model.layers)
    if n_layers != cfg.num_hidden_layers:
        raise AssertionError(f"{n_layers} layers built, config says {cfg.num_hidden_layers}")
    emb_rows = model.get_input_embeddings().weight.shape[0]
    if emb_rows != cfg.vocab_size:
        raise AssertionError(f"embedding has {emb_rows} rows, config vocab_size {cfg.vocab_size}")

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Hello, what is 2 + 3? def add(a, b): return a + b")["input_ids"]
    if not ids or max(ids) >= cfg.vocab_size:
        raise AssertionError(f"tokenizer ids {ids} out of range for vocab_size {cfg.vocab_size}")
    if len(tok) > cfg.vocab_size:
        raise AssertionError(f"tokenizer has {len(tok)} tokens, model only {cfg.vocab_size}")

    results = []
    for m in (model, auto):
        with torch.no_grad():
            x = torch.tensor([ids[:12], list(range(3, 15))])
            logits = m(input_ids=x).logits
        if tuple(logits.shape) != (2, 12, cfg.vocab_size):
            raise AssertionError(f"logits shape {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise AssertionError(f"non-finite logits in {logits.dtype}")
        results.append(logits.float())
    diff = (results[0] - results[1]).abs().max().item()
    if diff > 0.25 * results[0].std().item() + 1e-6:  # bf16 activations drift, but not this far
        raise AssertionError(f"float32 and {got_dtype} logits differ by {diff}")
    results = [f"logits finite (std {results[0].std():.3f}; float32 vs {got_dtype} max diff {diff:.3f})"]

    gen = ""
    if os.path.exists(os.path.join(out, "generation_config.json")):
        g = GenerationConfig.from_pretrained(out)
        gen = f", generation_config eos {g.eos_token_id}"
    return (f"{len(files)} file(s), {n_tensors} tensors ({'/'.join(sorted(stored_dtypes))}), "
            f"{n_layers} layers, vocab {cfg.vocab_size}, dtype=auto -> {got_dtype}; "
            f"tokenizer {type(tok).__name__} ({len(tok)} tokens, {len(ids)} ids); "
            f"{'; '.join(results)}{gen}")


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 2
    import torch
    import transformers
    import safetensors
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"safetensors {safetensors.__version__}, python {sys.version.split()[0]}")
    failed = 0
    for out in sys.argv[1:]:
        try:
            print(f"ok    {out}: {check(out)}")
        except Exception as e:  # report every folder, then fail
            failed += 1
            print(f"FAIL  {out}: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
