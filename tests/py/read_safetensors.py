#!/usr/bin/env python3
"""Reads a model folder written by smelt with the reference `safetensors` package (numpy API)
and prints JSON on stdout:

    {"files": [...], "index": {...} or null,
     "tensors": [{"name", "file", "dtype", "shape", "hex"}, ...]}

`hex` is the tensor's raw little-endian bytes. Every shard listed by
model.safetensors.index.json is read (or model.safetensors when there is no index), once
with `safetensors.numpy.load_file` and once with `safe_open(framework="np")`; the two must
agree. Used by tests/it/python_reader.rs.
"""

import json
import os
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: read_safetensors.py MODEL_DIR", file=sys.stderr)
        return 2
    folder = sys.argv[1]
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = None
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        files = sorted(set(index["weight_map"].values()))
    else:
        files = ["model.safetensors"]

    tensors = []
    for name in files:
        path = os.path.join(folder, name)
        loaded = load_file(path)
        with safe_open(path, framework="np") as f:
            keys = list(f.keys())
            if sorted(keys) != sorted(loaded.keys()):
                raise SystemExit(f"{path}: load_file and safe_open list different tensors")
            for key in keys:
                arr = f.get_tensor(key)
                if not np.array_equal(arr.view(np.uint8), loaded[key].view(np.uint8)):
                    raise SystemExit(f"{path}: {key} differs between load_file and safe_open")
                le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
                tensors.append(
                    {
                        "name": key,
                        "file": name,
                        "dtype": str(arr.dtype),
                        "shape": list(arr.shape),
                        "hex": le.tobytes().hex(),
                    }
                )
    json.dump({"files": files, "index": index, "tensors": tensors}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
