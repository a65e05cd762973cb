#!/usr/bin/env bash
# One machine: all local devices (CPU, or every GPU) in one process.
#
#   bash launch/local.sh configs/fashion_mnist.py /tmp/dino_fashion_mnist
#
# To try the multi-process path on one machine (CPU):
#   NUM_PROCESSES=2 bash launch/local.sh configs/fashion_mnist.py /tmp/dino
set -euo pipefail
USAGE='usage: [NUM_PROCESSES=N] bash launch/local.sh CONFIG WORKDIR [--config.a.b=c ...]'
EXAMPLE='  e.g. bash launch/local.sh configs/fashion_mnist.py /tmp/dino_fashion_mnist'
if [[ $# -lt 2 || "$1" == -h || "$1" == --help ]]; then
  if [[ $# -ge 1 && ("$1" == -h || "$1" == --help) ]]; then
    printf '%s\n%s\n' "$USAGE" "$EXAMPLE"
    exit 0
  fi
  echo "error: expected a config file and a workdir; $USAGE" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2
if ! [[ "${NUM_PROCESSES:-1}" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES=${NUM_PROCESSES} is not a positive integer; $USAGE" >&2
  exit 2
fi
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
