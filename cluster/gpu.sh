#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md ("On a GPU"), on a machine with one NVIDIA
# GPU and lte-ray installed. Usage: cluster/gpu.sh OUT STEP...   (STEP: tests workers share quality)
#   tests    pytest -m gpu (CUDA payloads, packed heads on CUDA, heads sharing the GPU on Ray)
#   workers  bench system --only-workers on CUDA: one head's memory and step time vs full-rank, ViT-S and GPT-S
#   share    bench share: 1, 2, 4, 8 heads on one GPU vs full-rank and (with ANCHOR=dir) the official code
#   quality  bench quality: full-rank vs LTE, GPT width 384 depth 6 context 256 on Shakespeare, LTE at 2x samples
set -uo pipefail
out=${1:?usage: cluster/gpu.sh OUT STEP...}; shift
mkdir -p "$out"
lte() { python3 -m lte_ray.cli "$@"; }
for step in "$@"; do
  start=$(date +%s)
  case $step in
    tests) python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -s 2>&1 | tee "$out/pytest_gpu.log" ;;
    workers)
      rc=0
      for preset in gpt-s vit-s; do
        lte bench system --preset "$preset" --only-workers --set train.device=cuda --precisions tf32,bf16 \
          --checkpointing off,on --output "$out/system-$preset" 2>&1 | tee "$out/system-$preset.log" || rc=1
      done
      (exit $rc) ;;
    share)
      lte bench share --preset gpt-s --heads 1,2,4,8 --rounds "${ROUNDS:-20}" ${ANCHOR:+--anchor-src "$ANCHOR"} \
        --set train.device=cuda --output "$out/share" 2>&1 | tee "$out/share.log" ;;
    quality)
      lte bench quality --datasets shakespeare-gpt-s --methods full,lte --budget-factor 2 --device cuda --jobs 2 \
        --output "$out/quality" 2>&1 | tee "$out/quality.log" ;;
    *) echo "cluster/gpu.sh: unknown step $step (tests workers share quality)" >&2; exit 2 ;;
  esac
  status=$?
  [ $status -eq 0 ] || failed="${failed:-}$step "
  echo "== $step: $(( $(date +%s) - start )) s, exit $status" | tee -a "$out/steps.log"
done
[ -z "${failed:-}" ] || { echo "cluster/gpu.sh: failed: $failed" >&2; exit 1; }
