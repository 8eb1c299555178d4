#!/usr/bin/env bash
# The GPU figures in one go (about 5 minutes on an H100 or H200 with 16 cores): the CUDA tests,
# then benchmarks/gpu_decode.py for ViT-B-32 and ViT-L-14 (random weights, fp16 autocast) on
# camera JPEGs (4000x3000) and 2 MP ones: `cliptagd scan` with CPU decoding and with GPU
# decoding (worker.gpu_decode: off / auto), and the two ceilings, the bare model on tensors in
# memory and decoding alone (Pillow on every core, and nvJPEG; no model). Run from the
# repository root on a machine with a CUDA build of torch:
#
#     bash benchmarks/gpu.sh                    # tests decode
#     bash benchmarks/gpu.sh decode             # one step
#     bash benchmarks/gpu.sh ViT-L-14           # benchmarks/run.py's bare model and scans
#
# Each throughput run uses 1,000 photos (200 different ones, linked under new names).
# Results land in benchmarks/results/.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
common=(--device cuda --batch 64 --count 1000 --distinct 200)
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
echo "cores: $(nproc)"
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(tests decode)
for step in "${steps[@]}"; do
    started=$SECONDS
    case $step in
        tests) "$python" -m pytest -q -p no:cacheprovider -m cuda tests || status=1 ;;
        decode) "$python" benchmarks/gpu_decode.py "${common[@]}" --models ViT-B-32 ViT-L-14 \
            || status=1 ;;
        *) "$python" benchmarks/run.py "${common[@]}" --loop-photos 32 --model "$step" \
            --reps 1 --only bare scan || status=1 ;;
    esac
    echo "step $step: $((SECONDS - started)) s"
done
exit $status
