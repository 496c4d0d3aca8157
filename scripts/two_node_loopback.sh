#!/usr/bin/env bash
# Two "nodes" on one machine: two torchrun agents on the loopback interface, one process each (node ranks 0 and 1),
# exactly as on two real hosts except that --master-addr is 127.0.0.1. Any command works; the default is a short
# MNIST-1D run with GradStatsDDPStrategy (logs under loopback-node0/runs/: rank 0 lives on node 0).
#
#   scripts/two_node_loopback.sh                                  # default demo run
#   scripts/two_node_loopback.sh python train.py --num-nodes 2    # your own script
#
# Environment: MASTER_PORT (default 29531), NPROC_PER_NODE (default 1), OMP_NUM_THREADS (default 1).
set -euo pipefail
PORT="${MASTER_PORT:-29531}"
NPROC="${NPROC_PER_NODE:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_DIRS=0
if [ "$#" -eq 0 ]; then
  # Each "node" runs in its own folder (loopback-node0/, loopback-node1/), as two hosts have their own disks: the
  # recipe's data cache is written once per node (Lightning's prepare_data_per_node), never twice into one folder.
  NODE_DIRS=1
  set -- lightning-sgd fit --config "$REPO/recipes/mnist1d.yaml" \
    --trainer.num_nodes=2 --trainer.devices="$NPROC" --trainer.max_steps=50 \
    --trainer.strategy.class_path=lightning_sgd.plugins.GradStatsDDPStrategy
fi
pids=()
for NODE in 0 1; do
  dir="."
  if [ "$NODE_DIRS" -eq 1 ]; then dir="loopback-node$NODE"; mkdir -p "$dir"; fi
  (cd "$dir" && exec torchrun --nnodes=2 --nproc-per-node="$NPROC" --node-rank="$NODE" \
    --master-addr=127.0.0.1 --master-port="$PORT" --no-python "$@") &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
