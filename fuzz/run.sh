#!/usr/bin/env bash
# Fuzzes smelt's parsers of untrusted input with cargo-fuzz (libFuzzer), each target for a fixed
# time budget. Not run in CI: run it by hand after touching a parser.
#
#   fuzz/run.sh                 # every target, 60 s each
#   fuzz/run.sh 300             # every target, 300 s each
#   fuzz/run.sh 120 recipe_parse parse_index
#
# Targets (fuzz/fuzz_targets/):
#   parse_header   smelt::io::safetensors::parse_header on whole-file bytes; whatever it
#                  accepts must have in-range, correctly sized, non-overlapping tensors
#   parse_index    smelt::io::model::parse_index; no accepted shard path may leave the folder
#   recipe_parse   smelt::recipe::Recipe::parse on YAML text; must not panic, hang or blow up
#   adapter_config smelt::lora::AdapterConfig::parse (PEFT adapter_config.json); must not panic
#   compeft_header smelt::compeft::Compressed::open on whole-file bytes; what it accepts
#                  decompresses to finite values of the recorded shapes
#   opcm_state     smelt::methods::opcm::parse_state on JSON; must not panic
#   torch_pickle   smelt::io::pickle::load_state_dict (data.pkl) and smelt::io::torch_zip::torch_tensors
#                  (a whole pytorch_model.bin) on the same bytes; what is accepted lies in the file
#
# cargo-fuzz needs nightly compiler flags (-Z sanitizer, coverage instrumentation). With only a
# stable toolchain, RUSTC_BOOTSTRAP=1 unlocks them; this script sets it. cargo-fuzz itself is
# installed from crates.io when missing.
#
# The corpus grows in fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET, kept in git); a crash
# or hang is written to fuzz/artifacts/TARGET/ and stops that target: the script then reports it,
# goes on with the others, and exits non-zero. Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# and turn it into a regression test in tests/it/reliability.rs. Corpus and artifacts stay out of
# git (fuzz/.gitignore). FUZZ_JOBS=N runs N fuzzing processes per target (default 1).
set -uo pipefail

budget=${1:-60}
shift || true
cd "$(dirname "$0")"
all=(parse_header parse_index recipe_parse adapter_config compeft_header opcm_state torch_pickle)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")

export RUSTC_BOOTSTRAP=1
# The repository's .cargo/config.toml builds for the native CPU; the fuzz build sets its own
# RUSTFLAGS (sanitizer, coverage), which replace that.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked || exit 1
fi

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "=== $t: ${budget} s" >&2
    # -timeout: one input running this long is a hang; -rss_limit_mb: unbounded allocation.
    jobs=()
    # with -jobs, libFuzzer logs to fuzz-N.log files instead of the terminal
    [ "${FUZZ_JOBS:-1}" -gt 1 ] && jobs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
    if ! cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$budget" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "${jobs[@]}"; then
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "no crash or hang in: ${targets[*]} (${budget} s each)" >&2
