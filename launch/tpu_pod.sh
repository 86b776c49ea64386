#!/usr/bin/env bash
# Install drex and start the same command on every worker of a Cloud TPU VM pod slice.
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh --config=configs/internvl2_2b.py \
#       --config.base.checkpoint=gs-fuse-or-local-dir --workdir=/mnt/shared/runs/2b
# jax.distributed finds the coordinator from the TPU metadata on every worker ('auto' mode), so no
# address is needed. The workdir must be a filesystem all workers share (e.g. a Filestore / GCS-fuse
# mount): orbax writes each worker's shards there and process 0 commits. A preflight stops the job with
# a clear message if a worker is missing or the mesh does not match the device count.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-https://github.com/drex-project/drex.git}
REF=${REF:-main}
MODULE=${MODULE:-drex.train}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  set -e
  if [ ! -d drex ]; then git clone --quiet $REPO drex; fi
  cd drex && git fetch --quiet origin $REF && git checkout --quiet FETCH_HEAD
  python3 -m venv ~/drex-venv && . ~/drex-venv/bin/activate
  pip install --quiet -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python -m $MODULE$args --config.distributed.mode=on 2>&1 | tee ~/drex-\$(hostname).log
"
