#!/usr/bin/env bash
# A one-node SLURM cluster on loopback, with job accounting, for `cai-bench run --backend hpc --slurm` on one
# machine and for the tests: munged, MariaDB, slurmdbd, slurmctld and slurmd (Debian's packages, installed where
# missing), every file under one directory. MariaDB and slurmd listen on 127.0.0.1 (slurmd where the host name
# resolves to loopback); slurmctld and slurmdbd of SLURM 22.05 have no bind address and listen on every
# interface, but take only messages signed with this cluster's own MUNGE key, made afresh at each `up`.
#
#   scripts/slurm-local.sh up     install where missing, write the configuration, start the daemons, wait for the
#                                 node; prints the line to source: export SLURM_CONF=...
#   scripts/slurm-local.sh down   stop every daemon it started and remove the directory
#   scripts/slurm-local.sh env    print that line again
#
# The directory is $CAI_BENCH_SLURM_DIR, else /tmp/cai-bench-slurm. The node is this machine's hostname with its
# CPUs and 90% of its memory. It runs as root (slurmd starts jobs as their owner; munged and slurmdbd as the
# SlurmUser, here root): in a container or a throwaway VM, not on a shared host.
set -euo pipefail

DIR=${CAI_BENCH_SLURM_DIR:-/tmp/cai-bench-slurm}
CLUSTER=cai-local
NODE=$(hostname -s)

say() { echo "slurm-local: $*" >&2; }
die() { say "$*"; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "$what did not come up within ${seconds}s; its log is under $DIR/log"
}

install_missing() {
    local missing=()
    for pair in munged:munge slurmctld:slurmctld slurmd:slurmd slurmdbd:slurmdbd sbatch:slurm-client \
                mariadbd:mariadb-server; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "${pair%%:*}" >/dev/null 2>&1 \
            || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: install them (apt-get install -y ${missing[*]}), as root"
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

write_config() {
    local cpus mem_mb password
    local bind_line="# $NODE does not resolve to a loopback address here: the daemons bind every interface"
    if getent hosts "$NODE" | awk '{print $1}' | grep -qE '^(127\.|::1$)'; then
        # slurmd binds the address its host name has (loopback here), not every interface; slurmctld and slurmdbd
        # of this SLURM release bind every interface whatever it says (each message they take is MUNGE-signed)
        bind_line="CommunicationParameters=NoInAddrAny"
    fi
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$password" > "$DIR/db.password"; chmod 600 "$DIR/db.password"
    cat > "$DIR/ports" <<PORTS
DB_PORT=$(free_port)
DBD_PORT=$(free_port)
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
PORTS
    # shellcheck disable=SC1091
    . "$DIR/ports"
    cat > "$DIR/etc/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in a container: processes are tracked through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# Not a password: with MUNGE, the socket that authenticates the connections to slurmdbd
AccountingStoragePass=$DIR/munge/munge.socket.2
$bind_line
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# A job past its time limit gets SIGTERM, then SIGKILL this many seconds later
KillWait=2
MinJobAge=600
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
# Up to 4 jobs share a CPU: the tests' arrays run beside each other (an array with --comm needs all its tasks at
# once) on a machine of 2 CPUs; --array-parallelism still limits an array's own tasks
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
    cat > "$DIR/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
CONF
    chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
    head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
    chmod 700 "$DIR/munge"; chmod 400 "$DIR/munge/munge.key"
    munged --force --num-threads=10 --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for 10 munged test -S "$DIR/munge/munge.socket.2"
}

start_mariadb() {
    mariadb-install-db --datadir="$DIR/db" --user=root --auth-root-authentication-method=socket --skip-test-db \
        > "$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
    mariadbd --datadir="$DIR/db" --socket="$DIR/run/mariadb.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --skip-name-resolve --pid-file="$DIR/run/mariadb.pid" --user=root --log-error="$DIR/log/mariadb.log" \
        --skip-log-bin --innodb-buffer-pool-size=64M > /dev/null 2>&1 &
    wait_for 30 MariaDB mariadb --socket="$DIR/run/mariadb.sock" -u root -e "SELECT 1"
    mariadb --socket="$DIR/run/mariadb.sock" -u root -e "
        CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/db.password")';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

up() {
    if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
        say "already up"; env_line; return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "run as root: slurmd and the daemons' SlurmUser are root here"
    install_missing
    export PATH=$PATH:/usr/sbin
    rm -rf "$DIR"
    mkdir -p "$DIR"/{etc,log,run,state,spool,munge,db}
    chmod 755 "$DIR"
    write_config
    export SLURM_CONF=$DIR/etc/slurm.conf
    local began=$SECONDS
    start_munge
    start_mariadb
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    slurmctld
    wait_for 30 slurmctld scontrol ping
    slurmd -N "$NODE"
    wait_for 60 "the node" bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
    say "up in $((SECONDS - began)) s: node $NODE, $(nproc) CPUs; state under $DIR"
    env_line
}

env_line() { echo "export SLURM_CONF=$DIR/etc/slurm.conf"; }

stop_pid() {  # stop_pid NAME: TERM, then KILL
    local file=$DIR/run/$1.pid pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    [ -d "$DIR" ] || { say "nothing under $DIR"; return 0; }
    export SLURM_CONF=$DIR/etc/slurm.conf
    # Jobs first (their steps are slurmstepd processes of their own), then the daemons, last started first
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for name in slurmd slurmctld slurmdbd mariadb munged; do stop_pid "$name"; done
    pkill -9 -f "slurmstepd.*$DIR" 2>/dev/null || true
    rm -rf "$DIR"
    say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) env_line ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
