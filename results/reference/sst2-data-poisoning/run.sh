#!/usr/bin/env bash
# Reference table: SST-2 (full train split), default model (minilm), seed 0,
# data-poisoning attacks x defenses. Resumable: victims and clean models are cached ($NLPBD_CACHE),
# so rerunning skips nothing but retrains nothing. Run from the repository root:
#   bash results/reference/sst2-data-poisoning/run.sh
set -euo pipefail
out=results/reference/sst2-data-poisoning
attacks=(badnet addsent synbkd stylebkd)
# Cheap defenses first so a partial run still gives a broad table; D3 (100 epochs) last.
defenses=(none ft btu finemix epur finemix-epur d3)
for defense in "${defenses[@]}"; do
  for attack in "${attacks[@]}"; do
    if grep -qs '"status": "ok"' "$out/records/sst2__minilm__full__${attack}__${defense}__s0__"*.json; then
      continue  # done; failed cells are retried
    fi
    nlpbd run --attack "$attack" --defense "$defense" --dataset sst2 --seed 0 --results-dir "$out" --quiet \
      || echo "cell $attack/$defense failed (see its record)"
  done
done
nlpbd table --results-dir "$out" --metrics cacc,asr,asr_floor,defense_seconds --format md -o "$out/table.md"
