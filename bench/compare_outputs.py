#!/usr/bin/env python3
"""Compare smelt's merged model with mergekit's, tensor by tensor (numpy only).

    python3 bench/compare_outputs.py METHOD SMELT_OUT MERGEKIT_OUT --base DIR --models DIR...
                                     [--density 0.5] [--json FILE]

Exact methods (linear, task_arithmetic, ties, ...): every element must satisfy
    |smelt - mergekit| <= 1e-7 + 1e-6 * |mergekit|
(the tolerance of tests/fixtures/mergekit/README.md); max |diff| and max relative diff are
reported (relative: over the elements with |mergekit| >= 1e-3 x the tensor's RMS; nearer zero,
sums that cancel differ relatively more and the absolute tolerance judges them). For
magnitude-trimming methods (ties) with bf16 inputs many |delta| values are equal, and mergekit's
torch.argsort keeps an unspecified subset of the elements tied at the k-th magnitude (smelt keeps
the lowest indices). An element outside the tolerance is then "explained" when, for some
fine-tune, its |delta| equals that fine-tune's k-th largest |delta| and the tie straddles the cut;
unexplained elements are a real disagreement.

Random methods (dare_*, della*): masks are smelt's own (Philox), not torch's, so values differ.
Per 2-D tensor, the fraction of elements with merged != base and the mean |merged - base| are
compared: |fraction difference| <= 0.05 and mean within 15% (the bounds of the fixture README).

Prints one summary line starting with AGREE or DIFFER; exits 0 / 1 accordingly (2 on errors).
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

EXACT_ABS, EXACT_REL = 1e-7, 1e-6
STAT_FRAC, STAT_MEAN = 0.05, 0.15
CHUNK = 1 << 22
REL_FLOOR = 1e-3  # max rel diff is over elements with |mergekit| >= 1e-3 * the tensor's RMS
TRIM_METHODS = {"ties", "breadcrumbs", "breadcrumbs_ties"}


class Model:
    """Lazy numpy view of a Hugging Face safetensors folder (single file or sharded)."""

    def __init__(self, path):
        self.path = path
        idx = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(idx):
            with open(idx) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
        if not files:
            raise SystemExit(f"compare_outputs.py: no safetensors files in {path}")
        self.tensors = {}
        for fn in files:
            full = os.path.join(path, fn)
            with open(full, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            mm = np.memmap(full, dtype=np.uint8, mode="r")
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                a, b = info["data_offsets"]
                self.tensors[name] = (mm, 8 + n + a, 8 + n + b, info["dtype"], tuple(info["shape"]))

    def get(self, name):
        mm, a, b, dt, shape = self.tensors[name]
        raw = mm[a:b]
        if dt == "F32":
            x = raw.view(np.float32)
        elif dt == "BF16":
            x = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            x = raw.view(np.float16).astype(np.float32)
        elif dt == "F64":
            x = raw.view(np.float64)
        else:
            raise SystemExit(f"compare_outputs.py: {self.path}: {name}: unsupported dtype {dt}")
        return np.asarray(x).reshape(shape)

    def dtype(self, name):
        return self.tensors[name][3]


def tie_explained(bad_idx, base, fts, density):
    """Which of the flat indices bad_idx are at a magnitude tie that straddles the k-th cut."""
    ok = np.zeros(bad_idx.size, dtype=bool)
    for ft in fts:
        d = np.abs((ft - base).reshape(-1))
        n = d.size
        k = max(1, int(density * n))
        if k >= n:
            continue
        thr = np.partition(d, n - k)[n - k]  # k-th largest
        above = int(np.count_nonzero(d > thr))
        at = int(np.count_nonzero(d == thr))
        if above < k < above + at:  # the tie straddles the cut
            ok |= d[bad_idx] == thr
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("smelt_out")
    ap.add_argument("mergekit_out")
    ap.add_argument("--base", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--json")
    a = ap.parse_args()

    s, m = Model(a.smelt_out), Model(a.mergekit_out)
    if set(s.tensors) != set(m.tensors):
        only_s = sorted(set(s.tensors) - set(m.tensors))[:5]
        only_m = sorted(set(m.tensors) - set(s.tensors))[:5]
        print(f"DIFFER: tensor names differ (only smelt: {only_s}, only mergekit: {only_m})")
        sys.exit(1)
    base = Model(a.base)
    fts = [Model(p) for p in a.models]
    random_method = a.method.startswith("dare") or a.method.startswith("della")
    report = {"method": a.method, "tensors": len(s.tensors), "dtypes": {}, "per_tensor": {}}
    agree = True

    if not random_method:
        max_abs = max_rel = 0.0
        n_el = n_bad = n_tie = 0
        worst = None
        for name in sorted(s.tensors):
            x, y = s.get(name), m.get(name)
            if x.shape != y.shape:
                print(f"DIFFER: {name}: shape {x.shape} vs {y.shape}")
                sys.exit(1)
            report["dtypes"][f"{s.dtype(name)}/{m.dtype(name)}"] = 1
            xf, yf = x.reshape(-1), y.reshape(-1)
            md = mr = 0.0
            bad_parts, bad_stats = [], []
            sq = sum(float(np.dot(c, c)) for c in
                     (yf[c0:c0 + CHUNK].astype(np.float64) for c0 in range(0, yf.size, CHUNK)))
            floor = max(REL_FLOOR * math.sqrt(sq / max(1, yf.size)), 1e-30)
            for c0 in range(0, xf.size, CHUNK):
                x64 = xf[c0:c0 + CHUNK].astype(np.float64)
                y64 = yf[c0:c0 + CHUNK].astype(np.float64)
                diff = np.abs(x64 - y64)
                ay = np.abs(y64)
                rel = np.where(ay >= floor, diff / np.maximum(ay, floor), 0.0)
                bad = diff > EXACT_ABS + EXACT_REL * ay
                if bad.any():
                    bi = np.flatnonzero(bad)
                    bad_parts.append(bi + c0)
                    bad_stats.append((diff[bi], rel[bi]))
                    diff[bi] = 0
                    rel[bi] = 0
                md = max(md, float(diff.max(initial=0)))
                mr = max(mr, float(rel.max(initial=0)))
            nb = sum(p.size for p in bad_parts)
            nt = 0
            if nb:
                idx = np.concatenate(bad_parts)
                bd = np.concatenate([d for d, _ in bad_stats])
                br = np.concatenate([r for _, r in bad_stats])
                if a.method in TRIM_METHODS:
                    b = base.get(name).astype(np.float32)
                    ex = tie_explained(idx, b, [f.get(name).astype(np.float32) for f in fts],
                                       a.density)
                    nt = int(np.count_nonzero(ex))
                    # Elements outside the tolerance only because of a tie are left out of the
                    # max abs/rel figures: they are not arithmetic differences.
                    bd, br = bd[~ex], br[~ex]
                md = max(md, float(bd.max(initial=0)))
                mr = max(mr, float(br.max(initial=0)))
            if md > max_abs:
                max_abs, worst = md, name
            max_rel = max(max_rel, mr)
            n_el += x.size
            n_bad += nb
            n_tie += nt
            if nb:
                report["per_tensor"][name] = {"outside_tol": nb, "tie_explained": nt,
                                              "max_abs": md, "max_rel": mr}
        unexplained = n_bad - n_tie
        agree = unexplained == 0
        report.update(elements=n_el, outside_tol=n_bad, tie_explained=n_tie,
                      unexplained=unexplained, max_abs=max_abs, max_rel=max_rel, worst=worst)
        msg = (f"{'AGREE' if agree else 'DIFFER'}: exact, {n_el:,} elements, max|d| {max_abs:.2e}, "
               f"max rel {max_rel:.2e}")
        short = f"{'ok' if agree else 'DIFFER'}: exact, max|d| {max_abs:.1e}, max rel {max_rel:.1e}"
        if n_bad:
            short += f", {n_bad / n_el:.1%} tie-broken, {unexplained} unexplained"
        if n_bad:
            msg += (f"; {n_bad:,} outside 1e-7+1e-6|x| ({n_bad / n_el:.2e}), {n_tie:,} of them at "
                    f"magnitude ties mergekit broke differently, {unexplained:,} unexplained")
        else:
            msg += ", all within 1e-7+1e-6|x|"
    else:
        worst_frac = worst_mean = 0.0
        fr_s, fr_m = [], []
        for name in sorted(s.tensors):
            x, y = s.get(name), m.get(name)
            if x.ndim != 2:
                continue
            b = base.get(name).astype(np.float32)
            dx, dy = x.astype(np.float32) - b, y.astype(np.float32) - b
            f_s, f_m = float(np.count_nonzero(dx) / dx.size), float(np.count_nonzero(dy) / dy.size)
            m_s, m_m = float(np.abs(dx).mean(dtype=np.float64)), float(np.abs(dy).mean(dtype=np.float64))
            rel_mean = abs(m_s - m_m) / max(m_m, 1e-30)
            worst_frac = max(worst_frac, abs(f_s - f_m))
            worst_mean = max(worst_mean, rel_mean)
            fr_s.append(f_s)
            fr_m.append(f_m)
            report["per_tensor"][name] = {"frac_changed_smelt": f_s, "frac_changed_mergekit": f_m,
                                          "mean_abs_delta_smelt": m_s, "mean_abs_delta_mergekit": m_m}
        agree = worst_frac <= STAT_FRAC and worst_mean <= STAT_MEAN
        report.update(max_frac_diff=worst_frac, max_mean_rel_diff=worst_mean)
        msg = (f"{'AGREE' if agree else 'DIFFER'}: statistical (random masks differ), "
               f"{len(fr_s)} matrices: fraction changed smelt {min(fr_s):.3f}-{max(fr_s):.3f}, "
               f"mergekit {min(fr_m):.3f}-{max(fr_m):.3f}, max |d fraction| {worst_frac:.4f} "
               f"(<= {STAT_FRAC}), max mean|delta| difference {100 * worst_mean:.2f}% "
               f"(<= {100 * STAT_MEAN:.0f}%)")
        short = (f"{'ok' if agree else 'DIFFER'}: stats, changed {min(fr_s):.3f}-{max(fr_s):.3f} vs "
                 f"{min(fr_m):.3f}-{max(fr_m):.3f}, mean|d| within {100 * worst_mean:.1f}%")
    report["agree"] = agree
    report["summary"] = msg
    report["short"] = short
    report["dtypes"] = sorted(report["dtypes"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    print(msg)
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        print(f"compare_outputs.py: error: {e}", file=sys.stderr)
        sys.exit(2)
