#!/usr/bin/env bash
# Create a Cloud TPU VM pod slice and run the same dino_jax command on every
# worker. JAX finds the other workers by itself (jax.distributed.initialize).
#
#   TPU_NAME=dino-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#   REPO=https://example.com/you/dino_jax.git WORKDIR=gs://bucket/vit_s16 \
#   bash launch/tpu_pod.sh --config=configs/vit_s16.py
#
# Extra arguments are passed to dino_jax.main (e.g. --config.batch_size=1024).
# WORKDIR should be a GCS path so every worker sees the same checkpoints,
# metrics and lock (the VMs' service account needs read/write on the bucket).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO=${REPO:-}
CREATE=${CREATE:-1}

if [[ "$CREATE" == 1 ]]; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION"
fi

run_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="$1"
}

if [[ -n "$REPO" ]]; then
  run_all "test -d dino_jax || git clone $(printf %q "$REPO") dino_jax; \
    cd dino_jax && pip install -q -e '.[gcs,tpu]'"
fi
# The same command on every host; a preemption notice makes it save and
# exit 0, and running this script again (CREATE=0) resumes from WORKDIR.
# Each argument is quoted for the remote shell (printf %q).
args=$(printf ' %q' "$@")
run_all "cd dino_jax && python -m dino_jax.main \
  --workdir=$(printf %q "$WORKDIR")$args"
