#!/usr/bin/env bash
# Side-by-side benchmark of smelt and mergekit 0.1.5 on CPU (not part of CI).
#
#   bench/compare_mergekit.sh [--size 640M] [--runs 3] [--methods "linear task_arithmetic ties dare_ties"]
#                             [--models-dir DIR] [--venv DIR] [--torch-from VENV] [--mergekit-opts "..."]
#                             [--smelt-bin PATH] [--work DIR] [--keep-outputs]
#
# What it does, in order:
#   1. a venv with mergekit==0.1.5 (default /tmp/smelt-bench-venv, reused when it has it). torch
#      comes from --torch-from VENV when given (or /tmp/tfvenv when that has torch and the same
#      Python): a .pth file puts that venv's site-packages on the path, so no torch download.
#      Otherwise torch is installed from the PyTorch CPU index, else from PyPI.
#   2. builds smelt (`cargo build --release`; --smelt-bin PATH skips the build).
#   3. generates base + ft1..ft3 with bench/make_models.py under MODELS_DIR/SIZE (default
#      /tmp/smelt-bench-models/640M; never inside the repository), unless models.json says they
#      are already there with the same size.
#   4. writes the recipes of bench/recipes/ into WORK/recipes with absolute model paths.
#   5. for each method, R runs of each tool, alternating (smelt, mergekit, smelt, ...), each after
#      `sync` and a read of every input file into the page cache, measured by bench/measure.py:
#      /usr/bin/time -v (wall time, peak RSS) plus /proc/PID/status sampling (RssAnon = RSS
#      without file-backed pages).
#        smelt:    target/release/smelt merge RECIPE -o OUT --device cpu --force --seed 42 [--hash blake3]
#        mergekit: mergekit-yaml RECIPE OUT --no-copy-tokenizer --random-seed 42 MERGEKIT_OPTS
#   6. compares the two outputs tensor by tensor (bench/compare_outputs.py: exact methods within
#      1e-7 + 1e-6|x|, magnitude ties explained; DARE by statistics).
#   7. prints a table of medians: wall time, peak RSS, peak anonymous RSS, GB/s, fraction of the
#      memory-copy bound, speed-up over mergekit, agreement; JSON of every run stays in WORK.
#
# Options (environment variables in brackets):
#   --size S            model size for make_models.py --params (640M) [SMELT_BENCH_SIZE]
#   --runs R            runs per tool and method (3) [SMELT_BENCH_RUNS]
#   --methods "..."     methods, recipes bench/recipes/METHOD.yml (linear task_arithmetic ties dare_ties)
#   --models-dir DIR    model cache (/tmp/smelt-bench-models) [SMELT_BENCH_MODELS]
#   --venv DIR          mergekit venv (/tmp/smelt-bench-venv) [SMELT_BENCH_VENV]
#   --torch-from VENV   reuse torch from this venv (auto: /tmp/tfvenv if usable; "none" to download)
#   --mergekit-opts S   extra mergekit-yaml options ("", i.e. its defaults: torch uses every core)
#   --smelt-bin PATH    use this smelt binary instead of building one
#   --work DIR          outputs, per-run JSON, logs (/tmp/smelt-bench-work/SIZE)
#   --keep-outputs      keep merged outputs (default: deleted after each method's comparison)
#   --skip-mergekit     time smelt only (no venv, no comparison)
#   --report-only       print the table of the runs already in WORK again, run nothing
#
# Needs: bash, python3 with numpy (for make_models.py), cargo, /usr/bin/time (installed with
# apt-get when missing and running as root), network access for the first venv setup. Disk: the
# models (4 x 2 bytes x params: 5.1 GB at 640M) plus two float32 outputs (2 x 4 x params).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$REPO/bench"
SIZE="${SMELT_BENCH_SIZE:-640M}"
RUNS="${SMELT_BENCH_RUNS:-3}"
METHODS="linear task_arithmetic ties dare_ties"
MODELS_ROOT="${SMELT_BENCH_MODELS:-/tmp/smelt-bench-models}"
VENV="${SMELT_BENCH_VENV:-/tmp/smelt-bench-venv}"
TORCH_FROM="auto"
MERGEKIT_OPTS=""
SMELT_BIN=""
WORK=""
KEEP=0
SKIP_MK=0
REPORT_ONLY=0
MERGEKIT_VERSION="0.1.5"

log() { printf '[compare_mergekit %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'compare_mergekit.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --size) SIZE="${2:?--size needs a value}"; shift 2 ;;
        --runs) RUNS="${2:?--runs needs a value}"; shift 2 ;;
        --methods) METHODS="${2:?--methods needs a value}"; shift 2 ;;
        --models-dir) MODELS_ROOT="${2:?}"; shift 2 ;;
        --venv) VENV="${2:?}"; shift 2 ;;
        --torch-from) TORCH_FROM="${2:?}"; shift 2 ;;
        --mergekit-opts) MERGEKIT_OPTS="${2-}"; shift 2 ;;
        --smelt-bin) SMELT_BIN="${2:?}"; shift 2 ;;
        --work) WORK="${2:?}"; shift 2 ;;
        --keep-outputs) KEEP=1; shift ;;
        --skip-mergekit) SKIP_MK=1; shift ;;
        --report-only) REPORT_ONLY=1; shift ;;
        -h|--help) usage 0 ;;
        *) printf 'compare_mergekit.sh: unknown option %s\n\n' "$1" >&2; usage 2 ;;
    esac
done
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer, got '$RUNS'"
[[ "$SIZE" =~ ^[0-9.]+[KMBG]?$ ]] || die "--size must look like 160M or 1.5B, got '$SIZE'"
for m in $METHODS; do
    [[ -f "$BENCH/recipes/$m.yml" ]] || die "no recipe bench/recipes/$m.yml for method '$m'"
done
MODELS="$MODELS_ROOT/$SIZE"
WORK="${WORK:-/tmp/smelt-bench-work/$SIZE}"
case "$MODELS/" in "$REPO"/*) die "--models-dir must be outside the repository ($REPO)" ;; esac
case "$WORK/" in "$REPO"/*) die "--work must be outside the repository ($REPO)" ;; esac

# The table (step 7), from the JSON files in WORK/runs.
print_table() {
"$PY" - "$WORK" "$MODELS" "$RUNS" "$METHODS" <<'EOF' | tee "$WORK/table.txt"
import glob, json, os, statistics, sys
work, models, runs, methods = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split()
done = [m for m in methods if glob.glob(os.path.join(work, "runs", f"{m}.smelt.*.json"))]
if done:
    runs = max(len(glob.glob(os.path.join(work, "runs", f"{m}.smelt.*.json"))) for m in done)
methods = done
def size(d):
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(d, "*.safetensors")))
params = json.load(open(os.path.join(models, "models.json")))["parameters"]
memcpy = None
p = os.path.join(work, "smelt_bench_memcpy.json")
if os.path.exists(p):
    memcpy = json.load(open(p)).get("memcpy_gbps")
print()
print(open(os.path.join(work, "machine.txt")).read().rstrip())
if memcpy:
    print(f"memory copy (smelt bench, same run): {memcpy:.2f} GB/s (read + written)")
print(f"{runs} run(s) per tool and method, medians (min-max); inputs in page cache")
print()
hdr = (f"{'method':<16} {'tool':<9} {'wall s':>22} {'cpu s':>7} {'peak RSS MiB':>13} {'anon MiB':>9} "
       f"{'GB/s':>6} {'of bound':>9} {'speed-up':>9}  agreement")
print(hdr)
print("-" * len(hdr))
for m in methods:
    recipe = open(os.path.join(work, "recipes", m + ".yml")).read()
    n_in = sum(size(os.path.join(models, x)) for x in ("base", "ft1", "ft2", "ft3")
               if f"{models}/{x}" in recipe)
    moved = n_in + 4 * params
    cmp_json = os.path.join(work, "runs", m + ".compare.json")
    cmp_txt = os.path.join(work, "runs", m + ".compare.txt")
    if os.path.exists(cmp_json):
        agreement = json.load(open(cmp_json))["short"]
    elif os.path.exists(cmp_txt):
        agreement = "ERROR: " + (open(cmp_txt).read().strip().splitlines() or ["?"])[-1][:60]
    else:
        agreement = "-"
    med = {}
    for tool in ("smelt", "mergekit"):
        rs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, "runs", f"{m}.{tool}.*.json")))]
        if not rs:
            continue
        w = [r["wall_s"] for r in rs]
        med[tool] = statistics.median(w)
        cpu = statistics.median(r["user_s"] + r["sys_s"] for r in rs)
        rss = statistics.median(r["maxrss_kb"] for r in rs) / 1024
        anon = statistics.median(r["peak_anon_kb"] for r in rs) / 1024
        gbps = moved / 1e9 / med[tool]
        bound = f"{100 * moved / 1e9 / memcpy / med[tool]:.0f}%" if memcpy else "-"
        sp = ""
        if tool == "smelt" and os.path.exists(os.path.join(work, "runs", f"{m}.mergekit.1.json")):
            mk = statistics.median(json.load(open(f))["wall_s"] for f in glob.glob(os.path.join(work, "runs", f"{m}.mergekit.*.json")))
            sp = f"{mk / med[tool]:.1f}x"
        wall = f"{med[tool]:.2f} ({min(w):.2f}-{max(w):.2f})"
        print(f"{m:<16} {tool:<9} {wall:>22} {cpu:>7.1f} {rss:>13.0f} {anon:>9.0f} {gbps:>6.2f} {bound:>9} {sp:>9}  "
              f"{agreement if tool == 'smelt' else ''}")
print()
print("""
wall s: /usr/bin/time elapsed; cpu s: user + sys; peak RSS: /usr/bin/time "Maximum resident set
size" (includes file-backed pages of mmap'd inputs); anon: largest RssAnon+RssShmem sampled from
/proc every 20 ms (what the process allocated); GB/s: (input file bytes + float32 output bytes) /
wall; of bound: (that traffic / memory-copy bandwidth) / wall; speed-up: mergekit median wall /
smelt median wall.""".strip())
EOF
}

if [[ $REPORT_ONLY -eq 1 ]]; then
    [[ -f "$WORK/machine.txt" && -f "$MODELS/models.json" ]] || die "nothing to report in $WORK (or no $MODELS/models.json)"
    PY=python3
    [[ -x "$VENV/bin/python" ]] && PY="$VENV/bin/python"
    print_table
    exit 0
fi

# --- tools ---------------------------------------------------------------------------------
command -v python3 >/dev/null || die "python3 not found"
python3 -c 'import numpy' 2>/dev/null || die "python3 has no numpy (pip install numpy)"
if [[ ! -x /usr/bin/time ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing GNU time (apt-get install time)"
        apt-get install -y -qq time >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq time; } \
            || die "could not install GNU time"
    else
        die "/usr/bin/time (GNU time) is missing: apt-get install time"
    fi
fi
time_out="$(/usr/bin/time -v true 2>&1 || true)"
[[ "$time_out" == *"Maximum resident set size"* ]] \
    || die "/usr/bin/time is not GNU time (no -v): apt-get install time"

# --- 1. mergekit venv ------------------------------------------------------------------------
PY=python3
setup_venv() {
    local vpy="$VENV/bin/python"
    if [[ -x "$vpy" ]] && "$vpy" -c "import importlib.metadata as m, sys; sys.exit(m.version('mergekit') != '$MERGEKIT_VERSION')" 2>/dev/null \
        && [[ -x "$VENV/bin/mergekit-yaml" ]] && "$vpy" -c 'import torch, numpy' 2>/dev/null; then
        log "reusing $VENV (mergekit $MERGEKIT_VERSION)"
        return
    fi
    log "creating $VENV with mergekit==$MERGEKIT_VERSION"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv?)"
    local sp torch_sp=""
    sp="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    local cand="$TORCH_FROM"
    [[ "$cand" == auto ]] && cand=/tmp/tfvenv
    if [[ "$cand" != none && -x "$cand/bin/python" ]]; then
        if [[ "$("$cand/bin/python" -c 'import sys; print(sys.version_info[:2])')" == "$("$vpy" -c 'import sys; print(sys.version_info[:2])')" ]] \
            && "$cand/bin/python" -c 'import torch' 2>/dev/null; then
            torch_sp="$("$cand/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        fi
    fi
    if [[ -n "$torch_sp" ]]; then
        log "torch from $cand (via $sp/_smelt_bench_torch.pth)"
        echo "$torch_sp" > "$sp/_smelt_bench_torch.pth"
    elif [[ "$TORCH_FROM" != auto && "$TORCH_FROM" != none ]]; then
        die "--torch-from $TORCH_FROM: no usable torch there (needs the same Python version)"
    else
        log "installing torch (CPU build from download.pytorch.org, else PyPI)"
        "$vpy" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
            || "$vpy" -m pip install -q torch || die "could not install torch"
    fi
    "$vpy" -m pip install -q "mergekit==$MERGEKIT_VERSION" numpy || die "pip install mergekit==$MERGEKIT_VERSION failed"
    [[ -x "$VENV/bin/mergekit-yaml" ]] || die "mergekit-yaml missing from $VENV/bin"
}
if [[ $SKIP_MK -eq 0 ]]; then
    setup_venv
    PY="$VENV/bin/python"
fi

# --- 2. smelt --------------------------------------------------------------------------------
if [[ -z "$SMELT_BIN" ]]; then
    command -v cargo >/dev/null || die "cargo not found (or pass --smelt-bin)"
    log "building smelt (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
    SMELT_BIN="$REPO/target/release/smelt"
fi
[[ -x "$SMELT_BIN" ]] || die "smelt binary $SMELT_BIN not found"
SMELT_EXTRA=()
merge_help="$("$SMELT_BIN" merge --help 2>&1 || true)"
if [[ "$merge_help" == *"--hash"* ]]; then SMELT_EXTRA+=(--hash blake3); fi

# --- 3. models -------------------------------------------------------------------------------
if [[ -f "$MODELS/models.json" ]] && python3 - "$MODELS/models.json" "$SIZE" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
sys.exit(0 if d.get("params_requested") == sys.argv[2] and d.get("seed") == 0 and len(d["models"]) == 4 else 1)
EOF
then
    log "models present: $MODELS"
else
    avail_kb=$(df -Pk "$(dirname "$MODELS_ROOT/.")" 2>/dev/null | awk 'NR==2 {print $4}' || echo 0)
    log "generating models under $MODELS (free: $((avail_kb / 1024 / 1024)) GiB)"
    mkdir -p "$MODELS"
    python3 "$BENCH/make_models.py" "$MODELS" --params "$SIZE" --models 3 --seed 0 --force \
        || die "make_models.py failed"
fi
mapfile -t INPUT_FILES < <(ls "$MODELS"/base/*.safetensors "$MODELS"/ft{1,2,3}/*.safetensors)
[[ ${#INPUT_FILES[@]} -ge 4 ]] || die "no model files under $MODELS"

# --- 4. recipes with absolute paths ------------------------------------------------------------
mkdir -p "$WORK/recipes" "$WORK/runs"
rm -f "$WORK"/runs/*
for m in $METHODS; do
    sed "s#\.\./models/#$MODELS/#g" "$BENCH/recipes/$m.yml" > "$WORK/recipes/$m.yml"
done

out_bytes=$(( $(python3 -c "import json; print(json.load(open('$MODELS/models.json'))['parameters'])") * 4 ))
need_kb=$(( out_bytes * 2 / 1024 + 1048576 ))
avail_kb=$(df -Pk "$WORK" | awk 'NR==2 {print $4}')
(( avail_kb > need_kb )) || die "not enough disk in $WORK: $((avail_kb / 1048576)) GiB free, need ~$((need_kb / 1048576)) GiB for two float32 outputs"

# --- machine and versions ----------------------------------------------------------------------
MEMCPY_JSON="$WORK/smelt_bench_memcpy.json"
"$SMELT_BIN" bench --device cpu --only primitives --elements 16M --repeats 3 --json "$MEMCPY_JSON" \
    >/dev/null 2>&1 || rm -f "$MEMCPY_JSON"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
    echo "smelt: $("$SMELT_BIN" --version) ($(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$REPO" && git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ', dirty'))"
    [[ $SKIP_MK -eq 1 ]] || echo "mergekit: $("$PY" -c 'import importlib.metadata as m, torch; print(m.version("mergekit"), "torch", torch.__version__, "threads", torch.get_num_threads())')"
    echo "models: $MODELS ($(python3 -c "import json; d=json.load(open('$MODELS/models.json')); print(f\"{d['parameters']:,} parameters, largest tensor {d['largest_tensor']['name']} {d['largest_tensor']['shape']}\")"))"
    echo "smelt command: $SMELT_BIN merge RECIPE -o OUT --device cpu --force --seed 42 ${SMELT_EXTRA[*]}"
    [[ $SKIP_MK -eq 1 ]] || echo "mergekit command: $VENV/bin/mergekit-yaml RECIPE OUT --no-copy-tokenizer --random-seed 42 $MERGEKIT_OPTS"
} > "$WORK/machine.txt"
cat "$WORK/machine.txt" >&2

warm() { cat "${INPUT_FILES[@]}" > /dev/null; }

run_one() { # tool method run
    local tool="$1" m="$2" r="$3" out="$WORK/out_$1_$2" json="$WORK/runs/$2.$1.$3.json" log="$WORK/runs/$2.$1.$3.log"
    rm -rf "$out" "$WORK"/.out_"$1"_"$2"* 2>/dev/null || true
    sync
    warm
    local rc=0
    if [[ "$tool" == smelt ]]; then
        "$PY" "$BENCH/measure.py" "$json" -- "$SMELT_BIN" merge "$WORK/recipes/$m.yml" -o "$out" \
            --device cpu --force --seed 42 "${SMELT_EXTRA[@]}" > "$log" 2>&1 || rc=$?
    else
        # shellcheck disable=SC2086
        "$PY" "$BENCH/measure.py" "$json" -- "$VENV/bin/mergekit-yaml" "$WORK/recipes/$m.yml" "$out" \
            --no-copy-tokenizer --random-seed 42 --quiet $MERGEKIT_OPTS > "$log" 2>&1 || rc=$?
    fi
    if [[ $rc -ne 0 ]]; then
        tail -20 "$log" >&2
        die "$tool $m run $r failed (exit $rc); log: $log"
    fi
    log "$m $tool run $r/$RUNS: $("$PY" -c "import json; d=json.load(open('$json')); print(f\"{d['wall_s']:.2f} s, peak RSS {d['maxrss_kb']/1024:.0f} MiB, anon {d['peak_anon_kb']/1024:.0f} MiB\")")"
}

# --- 5./6. runs and comparisons ---------------------------------------------------------------
STATUS=0
for m in $METHODS; do
    log "method $m"
    for r in $(seq 1 "$RUNS"); do
        run_one smelt "$m" "$r"
        [[ $SKIP_MK -eq 1 ]] || run_one mergekit "$m" "$r"
    done
    if [[ $SKIP_MK -eq 0 ]]; then
        log "comparing outputs of $m"
        if "$PY" "$BENCH/compare_outputs.py" "$m" "$WORK/out_smelt_$m" "$WORK/out_mergekit_$m" \
            --base "$MODELS/base" --models "$MODELS"/ft1 "$MODELS"/ft2 "$MODELS"/ft3 --density 0.5 \
            --json "$WORK/runs/$m.compare.json" > "$WORK/runs/$m.compare.txt" 2>&1; then
            :
        else
            STATUS=1
        fi
        cat "$WORK/runs/$m.compare.txt" >&2
    fi
    if [[ $KEEP -eq 0 ]]; then rm -rf "$WORK/out_smelt_$m" "$WORK/out_mergekit_$m"; fi
done

# --- 7. table ----------------------------------------------------------------------------------
print_table
[[ $STATUS -eq 0 ]] || log "outputs DIFFER for at least one method (see $WORK/runs/*.compare.txt)"
log "done: $WORK/table.txt, per-run JSON in $WORK/runs"
exit $STATUS
