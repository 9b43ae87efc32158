#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md ("On a GPU"), on a machine with one NVIDIA
# GPU and lte-ray installed. Usage: cluster/gpu.sh OUT STEP...   (STEP: tests workers share quality gpt-s-1x nano)
#   tests    pytest -m gpu (CUDA payloads, packed heads on CUDA, heads sharing the GPU on Ray)
#   workers  bench system --only-workers on CUDA: one head's memory and step time vs full-rank, ViT-S and GPT-S
#   share    bench share: 1, 2, 4, 8 heads on one GPU vs full-rank and (with ANCHOR=dir) the official code
#   quality  bench quality: full-rank vs LTE, GPT width 384 depth 6 context 256 on Shakespeare, LTE at 2x samples
#   gpt-s-1x bench quality: full-rank, one LoRA head and LTE at equal samples, the same GPT
#   nano     bench quality at nanoGPT's CPU size, 3 seeds: every baseline at 1x, LTE at 2x, weight decay,
#            full-rank rates 2e-3 and 8e-3 (docs/benchmarks.md, "Quality on a GPU: nanoGPT's CPU size")
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
    gpt-s-1x)
      lte bench quality --datasets shakespeare-gpt-s --methods full,lora,lte --device cuda --jobs 3 \
        --output "$out/quality-gpt-s-1x" 2>&1 | tee "$out/quality-gpt-s-1x.log" ;;
    nano)
      rc=0; nano=(--datasets shakespeare-nano,kjv-nano --seeds 3 --device cuda)
      lte bench quality "${nano[@]}" --methods full,lora,lora-merge,fira,lte --jobs 12 --output "$out/nano-1x" || rc=1
      lte bench quality "${nano[@]}" --methods full,lte --budget-factor 2 --jobs 12 --output "$out/nano-2x" || rc=1
      lte bench quality "${nano[@]}" --methods full,lte --jobs 12 --set train.weight_decay=0.1 \
        --vary "lte.decay_main=true,false" --output "$out/nano-weight-decay" || rc=1
      lte bench quality "${nano[@]}" --methods full --jobs 6 --set train.full_lr=0.002 --output "$out/nano-lr-2e-3" || rc=1
      lte bench quality "${nano[@]}" --methods full,lte --jobs 12 --set train.full_lr=0.008 \
        --output "$out/nano-lr-8e-3" || rc=1
      (exit $rc) ;;
    *) echo "cluster/gpu.sh: unknown step $step (tests workers share quality gpt-s-1x nano)" >&2; exit 2 ;;
  esac
  status=$?
  [ $status -eq 0 ] || failed="${failed:-}$step "
  echo "== $step: $(( $(date +%s) - start )) s, exit $status" | tee -a "$out/steps.log"
done
[ -z "${failed:-}" ] || { echo "cluster/gpu.sh: failed: $failed" >&2; exit 1; }
