#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests/test_slurm.py and for trying slurm/ by hand.
# slurmctld runs in the root network namespace; slurmd node1 and node2 each run in a network namespace of their own
# (own address, hostname and loopback, so a script that names localhost for another node fails here as it would on
# real hosts), joined by a bridge. Nothing outside $DIR is changed but the namespaces and the bridge: the nodes read
# $DIR/hosts as their /etc/hosts through a private mount namespace, and the machine's /etc/hosts is never touched.
# Each node has 2 CPUs and 2 "GPUs" that are only files, so that jobs may ask for GPUs and be told how many they got.
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages (.ci/run installs them).
#   tests/slurm/cluster.sh up      # (re)start: a cluster left over by a crashed run is taken down first
#   export SLURM_CONF=/tmp/distllama-slurm/slurm.conf && sinfo && sbatch --wait ...
#   tests/slurm/cluster.sh down    # stop every daemon and job process, remove the namespaces and the bridge
set -euo pipefail

DIR=/tmp/distllama-slurm  # configuration, state and logs (kept after down)
NODES=(node1 node2)
SUBNET=10.254.77     # node i at .i, the controller at .254
BRIDGE=distllama-br
CONF=$DIR/slurm.conf

netns() { echo "distllama-$1"; }

# Stop the process whose PID is in file $1, if it is still the daemon named $2 (a recycled PID is left alone).
stop_pidfile() {
  local pid
  [[ -f $1 ]] || return 0
  pid=$(<"$1")
  rm -f "$1"
  [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"$2"* ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -KILL "$pid" 2>/dev/null || true
}

# Every process inside a node's network namespace is this cluster's: slurmd, slurmstepd and job processes.
stop_node() {
  local ns
  ns=$(netns "$1")
  [[ -e /run/netns/$ns ]] || return 0
  # shellcheck disable=SC2046
  kill -TERM $(ip netns pids "$ns") 2>/dev/null || true
  for _ in $(seq 20); do [[ -z $(ip netns pids "$ns") ]] && break; sleep 0.25; done
  # shellcheck disable=SC2046
  kill -KILL $(ip netns pids "$ns") 2>/dev/null || true
  ip netns del "$ns" || true
}

down() {
  if [[ -f $CONF ]] && [[ -f $DIR/slurmctld.pid ]]; then
    SLURM_CONF=$CONF timeout 10 scancel --quiet --user=root 2>/dev/null || true  # jobs end with their steps
  fi
  for node in "${NODES[@]}"; do stop_node "$node"; done
  stop_pidfile "$DIR/slurmctld.pid" slurmctld
  stop_pidfile "$DIR/munged.pid" munged
  # The kernel may keep a deleted namespace a while, and its end of a veth pair with it: delete ours by name.
  for i in "${!NODES[@]}"; do ip link del "dlveth$i" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
}

write_config() {
  mkdir -p "$DIR/state"
  cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: two emulated nodes, no cgroups, no accounting.
ClusterName=distllama-ci
SlurmctldHost=localhost($SUBNET.254)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.own.pid
SlurmdPidFile=$DIR/slurmd-%n.own.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
# linuxproc + task/none: no cgroup work per job. slurmd 22.05 still loads a cgroup plugin (see cgroup.conf).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
InactiveLimit=0
# Finished jobs are forgotten after 4 s (not 300): sbatch --wait then polls every 2 s (not after 2, 10, 42, 74... s).
MinJobAge=4
KillWait=5
Waittime=0
EOF
  # GPUs that are only files: enough for Slurm to grant --gpus-per-node and tell the job (SLURM_GPUS_ON_NODE).
  echo "GresTypes=gpu" >>"$CONF"
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[i]} NodeHostname=${NODES[i]} NodeAddr=$SUBNET.$((i + 1)) CPUs=2 RealMemory=1000 Gres=gpu:2"
  done >>"$CONF"
  touch "$DIR/gpu0" "$DIR/gpu1"
  printf '%s\n' AutoDetect=off "Name=gpu File=$DIR/gpu[0-1]" >"$DIR/gres.conf"
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
  # slurmd 22.05 always initialises a cgroup plugin (CgroupPlugin=disabled comes in 23.02): /sys/fs/cgroup must stay
  # visible to it (so `ip netns exec`, which remounts /sys, is not used below). Nothing here constrains jobs.
  printf '%s\n' CgroupAutomount=no ConstrainCores=no ConstrainRAMSpace=no ConstrainDevices=no \
    IgnoreSystemdOnFailure=yes >"$DIR/cgroup.conf"
  { echo "127.0.0.1 localhost"; echo "::1 localhost"; echo "$SUBNET.254 slurmctl"
    for i in "${!NODES[@]}"; do echo "$SUBNET.$((i + 1)) ${NODES[i]}"; done; } >"$DIR/hosts"
}

network() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in "${!NODES[@]}"; do
    local ns veth="dlveth$i"
    ns=$(netns "${NODES[i]}")
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

up() {
  down
  rm -rf "$DIR"
  write_config
  network
  # Daemons run in the foreground (-D, -F) in sessions of their own (setsid), so that a tool that ends the caller's
  # process group does not take them along; setsid and nsenter/unshare exec, so $! is the daemon's own PID.
  if ! munge_works; then  # reuse a munged that answers (e.g. the munge service); otherwise start one
    install -d -o munge -g munge -m 0755 /run/munge
    setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F >"$DIR/munged.log" 2>&1 &
    echo $! >"$DIR/munged.pid"
    for _ in $(seq 50); do munge_works && break; sleep 0.1; done
  fi
  munge_works || { echo "munged does not answer: $(cat "$DIR/munged.log" 2>/dev/null)" >&2; return 1; }
  export SLURM_CONF=$CONF  # the daemons find cgroup.conf and gres.conf next to it (-f alone is not enough)
  setsid /usr/sbin/slurmctld -D -i -f "$CONF" >"$DIR/slurmctld.out" 2>&1 &
  echo $! >"$DIR/slurmctld.pid"
  for node in "${NODES[@]}"; do
    mkdir -p "$DIR/spool/$node"
    setsid nsenter --net="/run/netns/$(netns "$node")" unshare --uts --mount \
      sh -c "hostname $node && mount --bind $DIR/hosts /etc/hosts && exec /usr/sbin/slurmd -D -N $node -f $CONF" \
      >"$DIR/slurmd-$node.out" 2>&1 &
  done
  local idle
  for _ in $(seq 120); do
    idle=$(sinfo -h -N -o '%T' 2>/dev/null | grep -cx idle || true)
    [[ $idle == "${#NODES[@]}" ]] && { echo "SLURM_CONF=$CONF"; return 0; }
    sleep 0.25
  done
  echo "the nodes did not come up:" >&2
  sinfo -N >&2 || true
  tail -n 15 "$DIR"/*.log "$DIR"/*.out >&2 || true
  return 1
}

case ${1:-} in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
