#!/usr/bin/env bash
# The GPU figures in one go: the CUDA tests, then the benchmark for ViT-B-32 (every part) and
# ViT-L-14 (bare model and scans): the bare model in fp16 autocast against cliptagd with
# `precision: auto`, which is fp16 on CUDA. Run from the repository root on a machine with a
# CUDA build of torch:
#
#     bash benchmarks/gpu.sh                    # tests ViT-B-32 ViT-L-14
#     bash benchmarks/gpu.sh ViT-L-14           # one step
#
# A GPU encodes thousands of photos per second, so each throughput run uses 1,000 photos
# (200 different ones, repeated under new names). Results land in benchmarks/results/.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
common=(--device cuda --batch 64 --count 1000 --distinct 200 --loop-photos 32)
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
echo "cores: $(nproc)"
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(tests ViT-B-32 ViT-L-14)
for step in "${steps[@]}"; do
    case $step in
        tests) "$python" -m pytest -q -p no:cacheprovider -m cuda tests || status=1 ;;
        ViT-B-32) "$python" benchmarks/run.py "${common[@]}" --model ViT-B-32 --reps 3 \
            --drops 10 --only bare loop scan burst latency startup labels || status=1 ;;
        *) "$python" benchmarks/run.py "${common[@]}" --model "$step" --reps 1 \
            --only bare scan || status=1 ;;
    esac
done
exit $status
