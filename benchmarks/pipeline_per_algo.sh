#!/usr/bin/env bash
# Run the pipeline once per algorithm, all algorithms at once, each in its own copy of this project
# under OUT_DIR/work/<algo> (`quantorder compose algo=A $EXTRA_OVERRIDES && dvc repro`). On a GPU
# host every stage of the embedded default is bound by Python overhead, not by the GPU, so the
# copies finish in about the time of one. Collects per algorithm the summary, the per-variant
# metrics, the stage log and the wall time into OUT_DIR/<algo>.tgz and OUT_DIR/<algo>.summary.json.
# Used to compare the same pipeline across machines (CPU vs GPU perplexities).
#   EXTRA_OVERRIDES="tracking.enabled=false" benchmarks/pipeline_per_algo.sh OUT_DIR gptq awq
set -euo pipefail
out=$(realpath -m "${1:?usage: pipeline_per_algo.sh OUT_DIR ALGO...}"); shift
mkdir -p "$out/work"
run_one() {
  local algo=$1 work=$out/work/$1 start
  start=$(date +%s)
  mkdir -p "$work"
  tar -c --exclude=./.git --exclude=./.venv --exclude=./models --exclude=./data --exclude=./metrics \
    --exclude=./.dvc/cache --exclude=./.dvc/tmp --exclude='./.gpu-wheels' --exclude='./.carry-*' \
    --exclude="./$(realpath -m --relative-to=. "$out")" . | tar -x -C "$work"
  cd "$work"
  git init -q && git add -A && git -c user.name=quantorder -c user.email=quantorder@localhost commit -qm quantorder
  # shellcheck disable=SC2086
  python -m quantorder compose "algo=$algo" ${EXTRA_OVERRIDES:-}
  dvc repro
  echo "{\"algo\": \"$algo\", \"wall_s\": $(($(date +%s) - start))}" >metrics/wall.json
  cp metrics/summary.json "$out/$algo.summary.json"
  tar czf "$out/$algo.tgz" metrics dvc.lock params.yaml models/*/*/quantorder.json
}
algos=("$@") pids=()
for algo in "${algos[@]}"; do
  (run_one "$algo") >"$out/$algo.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  algo=${algos[$i]}
  if wait "${pids[$i]}"; then echo "$algo: done"; else echo "$algo: FAILED (see $out/$algo.log)" && status=1; fi
done
exit $status
