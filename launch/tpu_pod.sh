#!/usr/bin/env bash
# Install drex and start the same command on every worker of a Cloud TPU VM pod slice.
#   REPO=https://github.com/<you>/drex.git TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh \
#       --config=configs/internvl2_2b_cl.py --config.base.checkpoint=gs://my-bucket/InternVL2-2B \
#       --config.sources.chartqa.path=gs://my-bucket/ChartQA ... --workdir=gs://my-bucket/runs/2b_cl
# REPO (the git URL of your drex checkout; required) and REF (default main) say what every worker installs.
# jax.distributed finds the coordinator from the TPU metadata on every worker ('auto' mode), so no
# address is needed. The workdir is a gs:// path (or a filesystem all workers share, e.g. Filestore):
# orbax writes each worker's shards there and process 0 writes the JSON files and commits; drex reads and
# writes everything else through etils.epath, and TFDS builds the benchmarks from gs:// manual_dirs.
# A HF checkpoint on gs:// is copied once to ~/.cache/drex/checkpoints on each worker (safetensors are
# memory-mapped); a drex base there is read in place. A preflight stops the job with a clear message if a
# worker is missing or the mesh does not match the device count.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${REPO:?set REPO to the git URL of your drex repository}"
REF=${REF:-main}
MODULE=${MODULE:-drex.train}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  set -e
  if [ ! -d drex ]; then git clone --quiet $REPO drex; fi
  cd drex && git fetch --quiet origin $REF && git checkout --quiet FETCH_HEAD
  python3 -m venv ~/drex-venv && . ~/drex-venv/bin/activate
  pip install --quiet -e '.[gcs]' 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python -m $MODULE$args --config.distributed.mode=on 2>&1 | tee ~/drex-\$(hostname).log
"
