#!/usr/bin/env bash
# Run the pipeline once per algorithm in this workspace (`dvc exp run -S algo=A`, extra -S
# overrides from $EXTRA_S) and collect, per algorithm, the summary, the per-variant metrics, the
# stage log and the wall time into OUT_DIR/<algo>.tgz plus OUT_DIR/<algo>.summary.json.
# Used to compare the same pipeline across machines (CPU vs GPU perplexities).
#   benchmarks/pipeline_per_algo.sh OUT_DIR gptq awq
set -euo pipefail
out=${1:?usage: pipeline_per_algo.sh OUT_DIR ALGO...}; shift
mkdir -p "$out"
if [ ! -d .git ]; then  # DVC experiments need a commit
  git init -q && git add -A && git -c user.name=quantorder -c user.email=quantorder@localhost commit -qm quantorder
fi
for algo in "$@"; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  dvc exp run -S "algo=$algo" ${EXTRA_S:-} 2>&1 | tee "$out/$algo.log"
  echo "{\"algo\": \"$algo\", \"wall_s\": $(( $(date +%s) - start ))}" > metrics/wall.json
  cp metrics/summary.json "$out/$algo.summary.json"
  tar czf "$out/$algo.tgz" metrics dvc.lock params.yaml models/*/*/quantorder.json "$out/$algo.log"
done
