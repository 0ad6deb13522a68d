#!/usr/bin/env bash
# compare-binaries.sh: do two smelt binaries write the same bytes?
#
#   scripts/compare-binaries.sh OLD_BIN NEW_BIN [--work DIR] [--large-params SIZE] [--no-gpu]
#                                               [--only REGEX] [--keep]
#
# A check for refactors that must not change behaviour: build the binary before and after, then
#   scripts/compare-binaries.sh /tmp/smelt-base target/release/smelt
# It runs one fixed list of smelt commands with OLD_BIN, then the same list with NEW_BIN, and
# compares every file each command wrote byte for byte (as `cmp` does). One line per case:
# `same` or `DIFFERENT: <what>`; the exit status is 1 when any case differs or fails, 2 on a
# usage error.
#
# The cases (all CPU cases use --device cpu; merges and lora merge use --seed 42):
#   * on two model sets, "tiny" (assets/models: base, math, code, chat) and "large" (generated
#     by bench/make_models.py --params SIZE --models 3 --shard-size 20MB, default 30M; ft1, ft2,
#     ft3 play math, code, chat; merges there also pass --out-shard-size 20MB, so outputs are
#     sharded with an index):
#       - `smelt merge` of every recipe in assets/recipes/ and scripts/compare-recipes/, each
#         twice: with out_dtype forced to bfloat16 (`NAME.bf16`) and to float32 (`NAME.f32`);
#         on the large set only NAME.f32, and NAME.bf16 of assets/recipes (to save time).
#         A recipe whose text has a line `# compare-sets: tiny` runs on the tiny set only
#         (tsv, opcm: SVD-heavy, 35-45 s a merge at 30M; and the LoRA recipes);
#       - `smelt compress` of math and of code (their vectors are then merged by
#         compeft_ties.yml, as ../models/math-compeft and BASE+../models/code-compeft);
#       - tiny only: `smelt lora extract` (base -> math, base -> code, rank 4; used by
#         lora_extracted.yml), and `smelt continual` folding chat into opcm_pair.yml's merge;
#       - tiny only: ties.yml with --threads 1, --hash sha256 and --out-shard-size 100KB;
#   * on the PEFT fixtures (tests/fixtures/peft): `smelt lora apply` of seven adapters and
#     `smelt lora merge` with every --method (and the --majority-sign, --svd-clamp, --rank
#     options); the recipes peft_*.yml reach them as ../peft;
#   * `--device gpu` (lavapipe here): ties, dare_ties, della, model_stock, slerp, widen, pcb on
#     the tiny set, float32 output (the most sensitive), old-gpu against new-gpu. Skipped, with
#     a line saying so, under --no-gpu or when OLD_BIN's `smelt devices` lists no adapter.
#
# What is compared, per case: the exit status (a case that fails with OLD_BIN is reported as
# an ERROR: the case list itself is wrong), the list of files written, every file byte for
# byte (weights, model.safetensors.index.json, config.json, generation_config.json, tokenizer
# files, README.md model card, smelt-manifest.json, opcm-state.json, adapter_config.json,
# adapter_model.safetensors, compeft.safetensors), and the command's messages with every number
# masked (timings and rates vary between runs; wording, warnings and their order may not).
#
# Masking: smelt 0.1.0's model card and manifest hold no git hash and no timestamp (only the
# version, the inputs' content digests and paths, the seed and the recipe), so every file is
# compared raw, byte for byte. If a later smelt adds such a line, set SMELT_CMP_MASK to an
# extended regexp matching it: README.md and smelt-manifest.json are then compared with the
# matching lines removed, and the manifest without its README.md entry (the card's hash would
# differ with the masked line). Only under SMELT_CMP_MASK; by default nothing is masked.
#
# Paths: both binaries run in the same folder, WORK/run (then renamed WORK/old and WORK/new),
# reading the same inputs under WORK/inputs, so absolute paths written into outputs (OPCM state,
# compressed vectors, cards) are identical. WORK defaults to /tmp/smelt-compare; inputs (the
# generated models, fisher.safetensors beside every model) are made there, never in the repo,
# and kept between calls; outputs are replaced on each call.
#
# Options:
#   --work DIR           work folder (default /tmp/smelt-compare)
#   --large-params SIZE  size of the generated set (default 30M); 0 skips the large set
#   --no-gpu             skip the --device gpu cases
#   --only REGEX         run only the cases whose name matches (bash regexp; the commands whose
#                        outputs other cases read always run)
#   --keep               keep WORK/old and WORK/new after a clean run (always kept on a
#                        difference, for inspection)
# Environment knobs:
#   SMELT_CMP_SEED       the seed both binaries get (default 42)
#   SMELT_CMP_NEW_SEED   the seed NEW_BIN gets (default SMELT_CMP_SEED): set it to something else
#                        to watch the check catch a difference (the random methods' weights and
#                        every card's `seed:` line change)
#   SMELT_CMP_MASK       see Masking above
#   SMELT_CMP_MESSAGES=0 do not compare the commands' messages
#
# Needs bash, jq, python3 with numpy (the generated set, the Fisher files, the comparison).
# 209 cases. Both passes together take about 160 s of CPU time (user + sys; pcb and della on
# the large set are the slowest, 3-9 s each); 6-8 minutes of wall time were measured on a 2-core
# machine under a load of about 10, so expect a few minutes on an idle one. The last line
# reports the wall time of each pass.
# Each case's messages, exit status and time (real user sys) are in WORK/{old,new}/_log/.
set -uo pipefail

die() { echo "compare-binaries.sh: $*" >&2; exit 2; }
[[ $# -ge 2 ]] || die "usage: $0 OLD_BIN NEW_BIN [--work DIR] [--large-params SIZE] [--no-gpu] [--only REGEX] [--keep]"
abs_bin() { local p; p=$(command -v -- "$1") || die "no binary $1"; (cd "$(dirname "$p")" && echo "$PWD/$(basename "$p")"); }
OLD=$(abs_bin "$1")
NEW=$(abs_bin "$2")
shift 2
WORK=/tmp/smelt-compare
LARGE_PARAMS=30M
GPU=1
ONLY=
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --work) WORK=${2:?}; shift 2 ;;
        --large-params) LARGE_PARAMS=${2:?}; shift 2 ;;
        --no-gpu) GPU=0; shift ;;
        --only) ONLY=${2:?}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        *) die "unknown argument $1" ;;
    esac
done
SEED=${SMELT_CMP_SEED:-42}
NEW_SEED=${SMELT_CMP_NEW_SEED:-$SEED}
MASK=${SMELT_CMP_MASK:-}
MESSAGES=${SMELT_CMP_MESSAGES:-1}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$WORK" || die "cannot create $WORK"
WORK=$(cd "$WORK" && pwd)
case $WORK/ in "$REPO"/*) die "--work must be outside the repository ($REPO)" ;; esac
INPUTS=$WORK/inputs
RUN=$WORK/run
command -v jq >/dev/null || die "needs jq"
python3 -c 'import numpy' 2>/dev/null || die "needs python3 with numpy"

SETS=(tiny)
[[ $LARGE_PARAMS != 0 ]] && SETS+=(large)

# ---- inputs (shared by both binaries; made once, kept between calls) -----------------------

# fisher.safetensors for each model folder given: F32, the model's tensor names and shapes,
# values from a generator seeded by the folder's name (squares of normals, every 7th zero so
# that the minimal_fisher_weight floor matters). Written only when missing.
make_fisher() {
    python3 - "$@" <<'EOF'
import json, os, struct, sys, zlib
import numpy as np

def headers(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) \
        else ["model.safetensors"]
    out = {}
    for f in files:
        with open(os.path.join(d, f), "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h = json.loads(fh.read(n))
        out.update({k: v["shape"] for k, v in h.items() if k != "__metadata__"})
    return out

for d in sys.argv[1:]:
    path = os.path.join(d, "fisher.safetensors")
    if os.path.exists(path):
        continue
    shapes = headers(d)
    rng = np.random.default_rng(zlib.crc32(os.path.basename(d).encode()))
    header, blobs, off = {}, [], 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name])) if shapes[name] else 1
        v = rng.standard_normal(n, dtype=np.float32) ** 2
        v[::7] = 0.0
        b = v.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": shapes[name], "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path + ".tmp", "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for b in blobs:
            fh.write(b)
    os.replace(path + ".tmp", path)
EOF
}

# A model folder with copies of SRC's files (hard links with MODE "link"; smelt refuses
# symbolic links that leave the folder), so that fisher.safetensors can sit beside them
# without touching SRC.
link_model() {
    local src=$1 dst=$2 mode=${3:-copy} f
    mkdir -p "$dst"
    for f in "$src"/*; do
        [[ $(basename "$f") == models.json ]] && continue
        if [[ $mode == link ]]; then
            [[ -e $dst/$(basename "$f") ]] || ln "$f" "$dst/" 2>/dev/null || cp "$f" "$dst/" \
                || die "cannot copy $f to $dst"
        else
            cp -f "$f" "$dst/" || die "cannot copy $f to $dst"
        fi
    done
}

# The recipes of one set, each written twice with out_dtype forced: NAME.bf16.yml, NAME.f32.yml.
write_recipes() {
    local set=$1 dir=$INPUTS/$1/recipes f name dt
    rm -rf "$dir"
    mkdir -p "$dir"
    for f in "$REPO"/assets/recipes/*.yml "$REPO"/scripts/compare-recipes/*.yml; do
        name=$(basename "$f" .yml)
        if [[ $set != tiny ]] && grep -q '^# compare-sets: tiny' "$f"; then continue; fi
        for dt in bf16 f32; do
            # The large set: float32 output for every recipe (it shows a change in the last bit
            # that bf16 rounding would mostly hide), bfloat16 for assets/recipes only (time).
            if [[ $set != tiny && $dt == bf16 && $f != "$REPO"/assets/recipes/* ]]; then continue; fi
            # the generated large models have no tokenizer, which `tokenizer_source` requires
            local drop='/^out_dtype:/d'
            [[ $set != tiny ]] && drop+=';/^tokenizer_source:/d'
            { sed "$drop" "$f"
              [[ $dt == bf16 ]] && echo "out_dtype: bfloat16" || echo "out_dtype: float32"
            } > "$dir/$name.$dt.yml"
        done
    done
}

prepare_inputs() {
    local m src
    # tiny: assets/models
    for m in base math code chat; do
        link_model "$REPO/assets/models/$m" "$INPUTS/tiny/models/$m"
    done
    ln -sfn "$REPO/tests/fixtures/peft" "$INPUTS/tiny/peft"
    # large: bench/make_models.py, remade when the size asked for changed
    if [[ $LARGE_PARAMS != 0 ]]; then
        local gen=$INPUTS/large/gen
        if [[ ! -f $gen/models.json ]] || [[ $(jq -r .params_requested "$gen/models.json") != "$LARGE_PARAMS" ]]; then
            rm -rf "$INPUTS/large"
            echo "generating the large set ($LARGE_PARAMS) under $gen"
            python3 "$REPO/bench/make_models.py" "$gen" --params "$LARGE_PARAMS" --models 3 \
                --shard-size 20MB --force >/dev/null || die "make_models.py failed"
        fi
        for m in base:base math:ft1 code:ft2 chat:ft3; do
            link_model "$gen/${m#*:}" "$INPUTS/large/models/${m%%:*}" link
        done
    fi
    for s in "${SETS[@]}"; do
        make_fisher "$INPUTS/$s/models/math" "$INPUTS/$s/models/code" "$INPUTS/$s/models/chat" \
            || die "could not write the fisher.safetensors files"
        # Outputs of earlier cases that later cases read (dangling until that case runs).
        ln -sfn "$RUN/$s/compress-math" "$INPUTS/$s/models/math-compeft"
        ln -sfn "$RUN/$s/compress-code" "$INPUTS/$s/models/code-compeft"
        ln -sfn "$RUN/$s/lora-extract-math" "$INPUTS/$s/models/lora-math"
        ln -sfn "$RUN/$s/lora-extract-code" "$INPUTS/$s/models/lora-code"
        write_recipes "$s"
    done
}

# ---- one pass of every case with one binary ------------------------------------------------

BIN=
BSEED=
# c [-p] NAME ARGS...: run `BIN ARGS... -o RUN/NAME`, keep its messages and exit status.
# -p: another case reads this output, so it runs even when --only leaves it out.
c() {
    local producer=0
    [[ $1 == -p ]] && { producer=1; shift; }
    local name=$1
    shift
    if [[ -n $ONLY && $producer == 0 && ! $name =~ $ONLY ]]; then return 0; fi
    local log=$RUN/_log/${name//\//__}
    mkdir -p "$(dirname "$RUN/$name")"
    echo "$name" >> "$RUN/_log/cases"
    local TIMEFORMAT="%R %U %S" rc
    { time { "$BIN" "$@" -o "$RUN/$name" > "$log.out" 2>&1; rc=$?; }; } 2> "$log.time"
    echo $rc > "$log.rc"
}

# grep reads all of it (no -q): an early exit would break smelt's pipe and, under pipefail, fail
gpu_usable() { "$OLD" devices 2>/dev/null | grep '^\[0\]' >/dev/null; }

run_all() {
    BIN=$1
    BSEED=$2
    local s r name M P ex
    rm -rf "$RUN"
    mkdir -p "$RUN/_log"
    : > "$RUN/_log/cases"
    for s in "${SETS[@]}"; do
        M=$INPUTS/$s/models
        ex=()
        [[ $s == large ]] && ex=(--out-shard-size 20MB)
        c -p "$s/compress-math" compress "$M/math" --base "$M/base" --density 0.1 --device cpu
        c -p "$s/compress-code" compress "$M/code" --base "$M/base" --density 0.3 --alpha 2 --device cpu
        if [[ $s == tiny ]]; then
            c -p "$s/lora-extract-math" lora extract "$M/base" "$M/math" --rank 4 --device cpu
            c -p "$s/lora-extract-code" lora extract "$M/base" "$M/code" --rank 4 --device cpu
        fi
        for r in "$INPUTS/$s/recipes"/*.yml; do
            name=$(basename "$r" .yml)
            if [[ $s == tiny && $name == opcm_pair.f32 ]]; then
                c -p "$s/$name" merge "$r" --device cpu --seed "$BSEED"
            else
                c "$s/$name" merge "$r" --device cpu --seed "$BSEED" "${ex[@]}"
            fi
        done
        if [[ $s == tiny ]]; then
            c "$s/continual-chat" continual "$RUN/$s/opcm_pair.f32" "$M/chat" --device cpu
            r=$INPUTS/$s/recipes/ties.bf16.yml
            c "$s/ties.bf16.threads1" merge "$r" --device cpu --seed "$BSEED" --threads 1
            c "$s/ties.bf16.sha256" merge "$r" --device cpu --seed "$BSEED" --hash sha256
            c "$s/ties.f32.shards" merge "${r%.bf16.yml}.f32.yml" --device cpu --seed "$BSEED" --out-shard-size 100KB
        fi
    done
    # PEFT fixtures: lora apply and every lora merge method
    P=$REPO/tests/fixtures/peft
    for a in lora_a lora_embed lora_rs lora_pattern lora_mts lora_c lora_other; do
        if [[ $a == lora_other ]]; then
            c "peft/apply-$a" lora apply "$P/base_other" "$P/$a" --device cpu
        else
            c "peft/apply-$a" lora apply "$P/base" "$P/$a" --device cpu
        fi
    done
    local lm=(--device cpu --seed "$BSEED")
    c peft/merge-linear lora merge "$P/lora_a" "$P/lora_b" --method linear --weights 0.7,0.3 "${lm[@]}"
    c peft/merge-cat lora merge "$P/lora_a" "$P/lora_c" --method cat --weights 0.7,-0.3 "${lm[@]}"
    c peft/merge-svd lora merge "$P/lora_a" "$P/lora_c" --method svd --svd-rank 3 "${lm[@]}"
    c peft/merge-svd-clamp lora merge "$P/lora_a" "$P/lora_b" --method svd --svd-clamp 0.9 "${lm[@]}"
    c peft/merge-ties lora merge "$P/lora_a" "$P/lora_b" "$P/lora_rs" --method ties --density 0.5 --weights 0.5,0.3,0.2 "${lm[@]}"
    c peft/merge-ties-freq lora merge "$P/lora_a" "$P/lora_b" "$P/lora_rs" --method ties --density 0.5 --majority-sign frequency "${lm[@]}"
    c peft/merge-ties_svd lora merge "$P/lora_a" "$P/lora_b" --method ties_svd --density 0.6 "${lm[@]}"
    c peft/merge-dare_linear lora merge "$P/lora_a" "$P/lora_b" --method dare_linear --density 0.5 "${lm[@]}"
    c peft/merge-dare_linear_svd lora merge "$P/lora_a" "$P/lora_b" --method dare_linear_svd --density 0.5 "${lm[@]}"
    c peft/merge-dare_ties lora merge "$P/lora_a" "$P/lora_b" --method dare_ties --density 0.5 "${lm[@]}"
    c peft/merge-dare_ties_svd lora merge "$P/lora_a" "$P/lora_b" --method dare_ties_svd --density 0.5 --svd-rank 2 "${lm[@]}"
    c peft/merge-magnitude_prune lora merge "$P/lora_a" "$P/lora_b" --method magnitude_prune --density 0.4 "${lm[@]}"
    c peft/merge-magnitude_prune_svd lora merge "$P/lora_a" "$P/lora_b" --method magnitude_prune_svd --density 0.4 "${lm[@]}"
    c peft/merge-lego lora merge "$P/lora_a" "$P/lora_b" "$P/lora_c" --method lego --rank 6 "${lm[@]}"
    c peft/merge-single lora merge "$P/lora_b" --method ties --weights 0.5 "${lm[@]}"
    # GPU: old-gpu against new-gpu
    if [[ $GPU == 1 ]]; then
        for name in ties dare_ties della model_stock slerp widen pcb; do
            c "gpu/$name.f32" merge "$INPUTS/tiny/recipes/$name.f32.yml" --device gpu --seed "$BSEED"
        done
    fi
}

# ---- comparison -------------------------------------------------------------------------

# One Python process compares every case (a few thousand cmp, find and sed processes took
# longer than the merges on a loaded 2-core machine): per case the exit status, the file list,
# each file byte for byte (filecmp.cmp with shallow=False, i.e. what `cmp` does; with
# SMELT_CMP_MASK, README.md and smelt-manifest.json as described at the top) and the messages
# with the numbers masked. One line per case; exit status 1 when any case differs or failed.
compare_all() {
    python3 - "$WORK" "$MASK" "$MESSAGES" <<'EOF'
import filecmp, json, os, re, sys

work, mask, messages = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
mask_re = re.compile(mask) if mask else None

def files(d):
    out = set()
    for root, dirs, names in os.walk(d):
        for n in names:
            out.add(os.path.relpath(os.path.join(root, n), d))
    return out

def masked(path):
    with open(path, "rb") as f:
        data = f.read()
    if os.path.basename(path) == "smelt-manifest.json":
        j = json.loads(data)
        j.get("files", {}).pop("README.md", None)
        data = json.dumps(j, indent=2, sort_keys=True).encode()
    lines = data.decode("utf-8", "replace").splitlines()
    return [l for l in lines if not mask_re.search(l)]

def same(a, b):
    if mask_re and os.path.basename(a) in ("README.md", "smelt-manifest.json"):
        return masked(a) == masked(b)
    return filecmp.cmp(a, b, shallow=False)

RATE = re.compile(r"[0-9.]+ ?[KMGT]?i?B/s")
NUM = re.compile(r"[0-9]+")
def msgs(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return NUM.sub("N", RATE.sub("RATE", f.read()))

def read(path, default=None):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default

old, new = os.path.join(work, "old"), os.path.join(work, "new")
cases = read(os.path.join(old, "_log", "cases"), "").split("\n")
fails = 0
if cases != read(os.path.join(new, "_log", "cases"), "").split("\n"):
    print("DIFFERENT: the two passes ran different case lists")
    fails += 1
for name in filter(None, cases):
    key = name.replace("/", "__")
    lo, ln = os.path.join(old, "_log", key), os.path.join(new, "_log", key)
    rco, rcn = read(lo + ".rc"), read(ln + ".rc", "missing")
    if rco != "0":
        last = (read(lo + ".out", "") or "").splitlines()[-1:] or [""]
        print(f"{name:<44} ERROR: OLD_BIN exited {rco} ({last[0]})")
        fails += 1
        continue
    diffs = []
    if rcn != rco:
        diffs.append(f"exit status {rco} -> {rcn}")
    o, n = os.path.join(old, name), os.path.join(new, name)
    fo = files(o)
    if rcn == "0":
        fn = files(n)
        if fo != fn:
            diffs.append("file list: " + " ".join(
                [f"-{f}" for f in sorted(fo - fn)] + [f"+{f}" for f in sorted(fn - fo)]))
        diffs += [f for f in sorted(fo & fn) if not same(os.path.join(o, f), os.path.join(n, f))]
    if messages and msgs(lo + ".out") != msgs(ln + ".out"):
        diffs.append("(messages)")
    if diffs:
        print(f"{name:<44} DIFFERENT: {', '.join(diffs)}")
        fails += 1
    else:
        print(f"{name:<44} same ({len(fo)} files)")
print(f"{len(list(filter(None, cases)))} cases, {fails} different or failed", end="")
sys.exit(1 if fails else 0)
EOF
}

# ---- main ------------------------------------------------------------------------------

T0=$SECONDS
prepare_inputs
if [[ $GPU == 1 ]] && ! gpu_usable; then
    echo "gpu: skipped (OLD_BIN's \`smelt devices\` lists no adapter)"
    GPU=0
fi
echo "OLD_BIN $OLD (seed $SEED)"
echo "NEW_BIN $NEW (seed $NEW_SEED)"
[[ -n $MASK ]] && echo "masking lines matching /$MASK/ in README.md and smelt-manifest.json"
rm -rf "$WORK/old" "$WORK/new"
t=$SECONDS
run_all "$OLD" "$SEED"
mv "$RUN" "$WORK/old"
T_OLD=$((SECONDS - t))
t=$SECONDS
run_all "$NEW" "$NEW_SEED"
mv "$RUN" "$WORK/new"
T_NEW=$((SECONDS - t))

compare_all
fails=$?
echo "; OLD_BIN ${T_OLD}s, NEW_BIN ${T_NEW}s, total $((SECONDS - T0))s"
if [[ $fails != 0 ]]; then
    echo "outputs and messages kept in $WORK/old and $WORK/new (messages: _log/CASE.out)"
    exit 1
fi
[[ $KEEP == 1 ]] || rm -rf "$WORK/old" "$WORK/new"
exit 0
