#!/usr/bin/env bash
# A real Slurm cluster of two compute hosts on this one machine, for notebook-fabric's multi-host tests.
#
#   scripts/slurm_testbed.sh up       # install Slurm if missing, start it (idempotent)
#   scripts/slurm_testbed.sh status   # exit 0 when the cluster answers, with sinfo's view
#   scripts/slurm_testbed.sh down     # stop everything, remove the namespaces, restore /etc/hosts
#
# Layout: slurmctld and munged run here, in the root network namespace (the "login node" where the
# notebook runs). Each compute node is a network namespace (nfnode1, nfnode2) joined to the bridge
# nfbr0 by a veth pair whose inner end is named nf0 in every node (so one GLOO_SOCKET_IFNAME fits),
# with its own address (10.77.0.11, 10.77.0.12; the login node is 10.77.0.1). slurmd runs in its node
# with `nsenter --net=/run/netns/NODE unshare --uts` (`ip netns exec` remounts /sys, and slurmd then
# fails on cgroups) under its own host name. The configuration needs no cgroups (proctrack/linuxproc,
# task/none) and forgets finished jobs after 2 s (MinJobAge), so `squeue` shows only live jobs.
# Needs root and network namespaces. Traffic stays on these addresses and loopback.
set -euo pipefail

NODES=(nfnode1 nfnode2)
NODE_ADDRS=(10.77.0.11 10.77.0.12)
LOGIN_NAME=nflogin
LOGIN_ADDR=10.77.0.1
BRIDGE=nfbr0
INNER_IF=nf0
PREFIX=24
STATE=/run/nf-testbed
CONF=/etc/slurm/slurm.conf
HOSTS_MARK="# notebook-fabric slurm test bed"

log() { echo "slurm_testbed: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then log "needs root (network namespaces, slurmd)"; exit 2; fi
}

install_slurm() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v srun >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge (their own service start is blocked)"
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
    if [ "$created" = 1 ]; then rm -f "$policy"; fi
}

write_config() {
    mkdir -p /etc/slurm "$STATE" /var/spool/nf-testbed/ctld
    local nodes_line=""
    for i in "${!NODES[@]}"; do
        nodes_line+="NodeName=${NODES[$i]} NodeAddr=${NODE_ADDRS[$i]} CPUs=4 RealMemory=2000 State=UNKNOWN"$'\n'
    done
    if [ -e "$CONF" ] && ! grep -q "$HOSTS_MARK" "$CONF" && [ ! -e "$STATE/slurm.conf.orig" ]; then
        cp -p "$CONF" "$STATE/slurm.conf.orig"
    fi
    cat >"$CONF" <<EOF
$HOSTS_MARK (scripts/slurm_testbed.sh; \`down\` removes it)
ClusterName=nftestbed
SlurmctldHost=$LOGIN_NAME($LOGIN_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=2
KillWait=2
SlurmdTimeout=30
InactiveLimit=0
StateSaveLocation=/var/spool/nf-testbed/ctld
SlurmdSpoolDir=/var/spool/nf-testbed/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
${nodes_line}PartitionName=nf Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
}

add_hosts() {
    if grep -q "$HOSTS_MARK" /etc/hosts; then return; fi
    cp -p /etc/hosts "$STATE/hosts.orig"
    {
        echo "$LOGIN_ADDR $LOGIN_NAME $HOSTS_MARK"
        for i in "${!NODES[@]}"; do echo "${NODE_ADDRS[$i]} ${NODES[$i]} $HOSTS_MARK"; done
    } >>/etc/hosts
}

restore_hosts() {
    if [ -e "$STATE/hosts.orig" ]; then
        cat "$STATE/hosts.orig" >/etc/hosts  # in place: /etc/hosts may be a bind mount
        rm -f "$STATE/hosts.orig"
    elif grep -q "$HOSTS_MARK" /etc/hosts; then
        local kept; kept=$(grep -v "$HOSTS_MARK" /etc/hosts); printf '%s\n' "$kept" >/etc/hosts
    fi
}

make_network() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$LOGIN_ADDR/$PREFIX" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for i in "${!NODES[@]}"; do
        local node=${NODES[$i]} outer="nfv${i}"
        [ -e "/run/netns/$node" ] || ip netns add "$node"
        if ! ip link show "$outer" >/dev/null 2>&1; then
            ip link add "$outer" type veth peer name "$INNER_IF" netns "$node"
            ip link set "$outer" master "$BRIDGE"
            ip netns exec "$node" ip addr add "${NODE_ADDRS[$i]}/$PREFIX" dev "$INNER_IF"
        fi
        ip link set "$outer" up
        ip netns exec "$node" ip link set lo up
        ip netns exec "$node" ip link set "$INNER_IF" up
        ip netns exec "$node" ip route replace default via "$LOGIN_ADDR" dev "$INNER_IF" 2>/dev/null || true
    done
}

alive() { [ -e "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n </dev/null >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return; sleep 0.1; done
    log "munged did not start"; exit 1
}

start_slurmctld() {
    if alive "$STATE/slurmctld.pid"; then return; fi
    # its own UTS namespace: slurmctld insists that the host name is SlurmctldHost's
    unshare --uts sh -c "hostname $LOGIN_NAME; exec /usr/sbin/slurmctld -i"
}

start_slurmd() {
    local node=$1
    if alive "$STATE/slurmd-$node.pid"; then return; fi
    mkdir -p "/var/spool/nf-testbed/$node"
    nsenter --net="/run/netns/$node" unshare --uts sh -c "hostname $node; exec /usr/sbin/slurmd -N $node"
}

wait_idle() {
    for _ in $(seq 150); do
        local idle; idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c -E ' (idle|mix|alloc)$' || true)
        [ "$idle" -ge "${#NODES[@]}" ] && return 0
        sleep 0.1
    done
    log "the nodes did not come up:"; sinfo -N 2>&1 >&2 || true; return 1
}

up() {
    need_root
    install_slurm
    mkdir -p "$STATE"
    write_config
    add_hosts
    make_network
    start_munge
    start_slurmctld
    for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    for node in "${NODES[@]}"; do  # a node killed earlier comes back only when asked
        scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    done
    wait_idle
    log "up: $(sinfo -h -o '%P %D %t %N' | tr '\n' ' ')"
}

stop_pidfile() {
    local file=$1
    if alive "$file"; then
        local pid; pid=$(cat "$file"); kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    need_root
    if command -v scancel >/dev/null && scontrol ping >/dev/null 2>&1; then
        scancel --full --signal=KILL --state=RUNNING -u root >/dev/null 2>&1 || true
        scancel -u root >/dev/null 2>&1 || true
    fi
    for node in "${NODES[@]}"; do stop_pidfile "$STATE/slurmd-$node.pid"; done
    for node in "${NODES[@]}"; do  # slurmstepd and ranks still in the node
        if [ -e "/run/netns/$node" ]; then
            for pid in $(ip netns pids "$node" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        fi
    done
    stop_pidfile "$STATE/slurmctld.pid"
    pkill_munged
    for i in "${!NODES[@]}"; do
        ip link del "nfv${i}" 2>/dev/null || true
        ip netns del "${NODES[$i]}" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    restore_hosts
    if [ -e "$CONF" ] && grep -q "$HOSTS_MARK" "$CONF"; then
        rm -f "$CONF"
        [ -e "$STATE/slurm.conf.orig" ] && mv "$STATE/slurm.conf.orig" "$CONF"
    fi
    rm -rf /var/spool/nf-testbed "$STATE"
    log "down"
}

pkill_munged() {
    local file=/run/munge/munged.pid
    if [ -e "$file" ]; then stop_pidfile "$file"; fi
}

status() {
    if ! scontrol ping >/dev/null 2>&1; then log "not up (scontrol ping fails)"; return 1; fi
    sinfo -N -o '%N %t %c' && squeue
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
