#!/usr/bin/env bash
# Start `python -m distllama.generate` under torchrun on this node; every argument goes to distllama.generate.
# One node: run it once. Several nodes: run it on every node with the same NNODES, MASTER_ADDR and MASTER_PORT.
#   NPROC_PER_NODE=4 launch/torchrun.sh --config configs/tiny-cpu.yaml --model ./my-llama
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 NPROC_PER_NODE=8 launch/torchrun.sh --config configs/llama3-70b-2node.yaml
# Global rank = pp_rank * tp + tp_rank, so with NPROC_PER_NODE = tp each node holds one tensor-parallel group (one
# pipeline stage): tp all-reduces stay on the node's NVLink and only hidden states cross nodes.
#
# Environment (defaults are a single node):
#   NNODES          nodes in the run (1)
#   NODE_RANK       this node's index, 0..NNODES-1 (0); informational for NNODES > 1, where c10d numbers nodes
#                   in join order (rank 0 may be on any node: keep --output on shared storage)
#   MASTER_ADDR     NNODES > 1: required, the address of node 0 that every node can reach; a loopback address is
#                   refused, as each node would rendezvous with itself and wait forever. One node: 127.0.0.1
#   MASTER_PORT     NNODES > 1: a free port on MASTER_ADDR, the same on every node (29500). One node: unset, torchrun
#                   picks a free port itself (--standalone), so two runs sharing a node do not collide
#   NPROC_PER_NODE  processes on this node (the number of GPUs nvidia-smi lists, else 1)
#   RDZV_ID         multi-node run id, the same on every node (distllama)
set -euo pipefail

die() { echo "launch/torchrun.sh: error: $*" >&2; exit 2; }

gpu_count() {
  local n
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  echo "${n:-0}"
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(gpu_count)
  (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=1
fi

args=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE")
if (( NNODES > 1 )); then
  [[ -n ${MASTER_ADDR:-} ]] || die "NNODES=$NNODES needs MASTER_ADDR, the address of node 0 that every node can reach"
  case $MASTER_ADDR in
    localhost | localhost.* | 127.* | ::1)
      die "MASTER_ADDR=$MASTER_ADDR is a loopback address: with NNODES=$NNODES each node would rendezvous with" \
        "itself; give node 0's address on the network the nodes share" ;;
  esac
  addresses=$(getent ahosts "$MASTER_ADDR" | awk '{print $1}' | sort -u) || true
  [[ -n $addresses ]] || die "MASTER_ADDR=$MASTER_ADDR does not resolve to an address on this node"
  # On node 0 its own name may resolve to 127.0.1.1 (Debian's /etc/hosts), and that works; on another node it
  # would point the node at itself.
  if (( NODE_RANK > 0 )) && ! grep -qv -e '^127\.' -e '^::1$' <<<"$addresses"; then
    die "MASTER_ADDR=$MASTER_ADDR resolves to a loopback address on node $NODE_RANK, which would rendezvous with itself"
  fi
  MASTER_PORT=${MASTER_PORT:-29500}
  # c10d rendezvous (as torchtitan launches): nodes may start in any order, and the agent on MASTER_ADDR hosts the
  # store. Ranks are handed out per node in join order, so each node still gets NPROC_PER_NODE consecutive ranks.
  echo "distllama: node $NODE_RANK of $NNODES, $NPROC_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
  args+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-distllama}")
elif [[ -n ${MASTER_PORT:-} ]]; then
  args+=(--node-rank "$NODE_RANK" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$MASTER_PORT")
else
  args+=(--standalone)
fi

exec torchrun "${args[@]}" -m distllama.generate "$@"
