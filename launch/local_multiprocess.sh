#!/usr/bin/env bash
# Run a drex command as N JAX processes on this machine (CPU, loopback), e.g. to test multi-host code:
#   launch/local_multiprocess.sh 2 drex.train --config=configs/task3.py:smoke --workdir=runs/two_hosts
# Every process gets the same arguments plus its process id; process 0 prints, the others log to
# WORKDIR-independent files under ${LOG_DIR:-/tmp/drex-local}.
set -euo pipefail
n=${1:?usage: launch/local_multiprocess.sh NUM_PROCESSES MODULE [ARGS...]}
module=${2:?usage: launch/local_multiprocess.sh NUM_PROCESSES MODULE [ARGS...]}
shift 2
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-/tmp/drex-local}
mkdir -p "$log_dir"
pids=()
for ((i = 1; i < n; i++)); do
  python -m "$module" "$@" --config.distributed.mode=on --config.distributed.coordinator="127.0.0.1:$port" \
    --config.distributed.num_processes="$n" --config.distributed.process_id="$i" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
python -m "$module" "$@" --config.distributed.mode=on --config.distributed.coordinator="127.0.0.1:$port" \
  --config.distributed.num_processes="$n" --config.distributed.process_id=0
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
exit $status
