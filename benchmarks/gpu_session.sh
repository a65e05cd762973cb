#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one run that fits one
# device call (under 10 minutes), each step under its own `timeout`, logs
# and JSON lines under $OUT. Prepare once on the CPU machine:
#
#   ../shared/tools/gpu-prepare                  # .gpu/: wheels, data, run
#   cp -r ../shared/official-dino .gpu/          # the PyTorch side
#   TINY=1 OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh   # try on CPU
#
# then on the GPU machine (device tool, carry [".gpu"]):
#
#   bash .gpu/run bash benchmarks/gpu_session.sh
#
# Steps, most important first (seconds: the timeout of each):
#   1 train_step  ViT-S/16, batch 128, bf16 + fused attention: dino_jax with
#                 on-device augmentation, with ready crops, and the official
#                 vision_transformer.py under fp16 autocast: img/s, ratio,
#                 analytic MFU, augmentation share, peak memory (150)
#   2 batch256    the same dino_jax sides at batch 256 (70)
#   3 demo        configs/fashion_mnist.py:gpu to the end, evaluation
#                 included: wall time, k-NN table, img/s (270)
#   4 host        the host pipeline alone, 28 px IDX and 500x375 JPEGs, 0 and
#                 8 workers: img/s per core, cores per accelerator (60)
# TINY=1 runs each step at toy sizes (CPU check of the script itself).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
TINY=${TINY:-0}
py=${PYTHON:-python3}
official=${OFFICIAL:-}
for d in .gpu/official-dino ../shared/official-dino; do
  [ -z "$official" ] && [ -f "$d/main_dino.py" ] && official=$d
done
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$gpu" in  # dense bf16 peak TFLOP/s, for MFU
  *H100* | *H200*) peak=989 ;;
  *A100*) peak=312 ;;
  *) peak=0 ;;
esac
data=/usr/share/datasets/fashion-mnist
[ -d .gpu/data ] && data=.gpu/data

step() {  # name seconds command...: runs, logs, records rc and wall time
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  echo "== $name (timeout ${seconds}s): $*" | tee -a "$OUT/summary.txt"
  timeout -s TERM -k 20 "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc wall=$((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

{
  date -u
  echo "gpu: ${gpu:-none}, peak ${peak} TFLOP/s, official: ${official:-none}"
  git log --oneline -1 2>/dev/null
  nvidia-smi 2>/dev/null | head -15
  $py -c 'import jax, flax, optax; print(jax.__version__, flax.__version__,
optax.__version__, jax.devices())'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

sides=jax_aug,jax
[ -n "$official" ] && sides=jax_aug,jax,torch
if [ "$TINY" = 1 ]; then
  batch=4
  shape=(--arch vit_tiny --steps 1 --global_size 32
    --local_size 16 --locals 2 --canvas 40 --out_dim 256)
  demo=(--config.total_steps=6 --config.eval.max_train_images=2000
    --config.eval.max_test_images=500 --config.data.num_workers=2
    --config.eval_every_steps=0)
  host=(--images 8 --batch 4 --seconds 1 --num_workers 0,2)
  t=(600 300 600 200)
else
  batch=128
  shape=(--arch vit_small --steps 10)
  demo=()
  host=(--images 200 --seconds 5 --num_workers 0,8)
  t=(150 70 270 60)
fi
bf16=(--dtype bfloat16 --attention fused --peak_tflops "$peak")
repo=()
[ -n "$official" ] && repo=(--official_repo "$official")

step train_step "${t[0]}" $py benchmarks/train_step.py "${shape[@]}" \
  --batch "$batch" \
  "${bf16[@]}" --sides "$sides" "${repo[@]}" --out "$OUT/train_step.jsonl"
step batch256 "${t[1]}" $py benchmarks/train_step.py "${shape[@]}" \
  --batch $((2 * batch)) \
  "${bf16[@]}" --sides jax_aug,jax --out "$OUT/train_step.jsonl"
step demo "${t[2]}" $py -m dino_jax.main --config=configs/fashion_mnist.py:gpu \
  --workdir="$OUT/demo" --config.data.path="$data" "${demo[@]}"
step host "${t[3]}" $py benchmarks/host_pipeline.py --fashion_mnist "$data" \
  "${host[@]}" --out "$OUT/host_pipeline.jsonl"
# The demo's workdir holds checkpoints: keep the metrics and the tables only.
rm -rf "$OUT/demo/checkpoints" "$OUT/demo/tensorboard"
cat "$OUT/summary.txt"
