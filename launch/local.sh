#!/usr/bin/env bash
# One machine: all local devices (CPU, or every GPU) in one process.
#
#   bash launch/local.sh configs/fashion_mnist.py /tmp/dino_fashion_mnist
#
# To try the multi-process path on one machine (CPU):
#   NUM_PROCESSES=2 bash launch/local.sh configs/fashion_mnist.py /tmp/dino
set -euo pipefail
CONFIG=${1:?config file}
WORKDIR=${2:?workdir}
shift 2
NUM_PROCESSES=${NUM_PROCESSES:-1}
if [[ "$NUM_PROCESSES" == 1 ]]; then
  exec python -m dino_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
fi
PORT=${PORT:-$((20000 + RANDOM % 10000))}
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  python -m dino_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address=127.0.0.1:$PORT --num_processes="$NUM_PROCESSES" \
    --process_id=$i "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
wait "${pids[@]}"
