#!/usr/bin/env bash
# ---- SLURM defaults for `sbatch launch.sh RECIPE.yaml [key=value ...]`: edit them here, in this one block ----
# (sbatch reads #SBATCH lines only above the first command; command-line flags of sbatch override them)
#SBATCH --job-name=hiddenkey-ds
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# --ntasks-per-node=1: one launcher per node, which starts one rank per GPU. --mem=0: all of a node's memory.
# The job's own output file holds only the launcher's lines; per-node/rank logs go to RUN_DIR/logs/.
# -------------------------------------------------------------------------------------------------------------
#
# launch.sh [options] RECIPE.yaml [key=value ...]  --  train a recipe locally, on a hostfile's nodes, or on SLURM
#
# Modes (picked automatically; --mode or HKDS_MODE forces one):
#   local     all visible GPUs of this machine; without a GPU, HKDS_CPU_RANKS CPU ranks (gloo, default 2)
#   hostfile  --hostfile FILE ("host slots=N" lines, DeepSpeed's format): starts node i of the file on host i
#             over pdsh (or ssh, HKDS_REMOTE=ssh) in the same directory; with --node-rank R it runs only node R
#             here, without ssh (start each node yourself: same command, R = 0..N-1, same --master-addr)
#   slurm     inside sbatch/salloc (SLURM_JOB_ID set): head node from `scontrol show hostnames` (its address from
#             `scontrol show node`: NodeAddr), one launcher per
#             node via srun with its node rank (SLURM_NODEID), no ssh, environment propagated (--export=ALL)
#
# Options (before RECIPE.yaml; everything after it goes to `python -m hiddenkey_ds.train` untouched):
#   --dry-run             print the exact command(s) each node would run, run nothing
#   --hostfile FILE       multi-node hostfile (see hostfile mode)
#   --node-rank R         with --hostfile: run node R of the file on this machine, no ssh
#   --master-addr ADDR    address of node 0 (default: $MASTER_ADDR or the first hostfile host / SLURM head node / 127.0.0.1)
#   --master-port PORT    rendezvous port (default: $MASTER_PORT, else 29500; under SLURM 29500 + job id % 10000)
#   --mode MODE           local | hostfile | slurm
#   -h, --help            this text
#
# Environment:
#   HKDS_CPU_RANKS=2       ranks per node when the node has no GPU
#   HKDS_PYTHON=python3    interpreter with hiddenkey_ds + deepspeed installed (resolved to an absolute path)
#   HKDS_TRAIN_MODULE=hiddenkey_ds.train   the module every rank runs with `python -u -m` (e.g. your own fork's)
#   HKDS_REMOTE=pdsh|ssh   how hostfile mode reaches the nodes (default: pdsh when installed, else ssh)
#   HKDS_EXPORT="A B"      extra variable names to carry to pdsh/ssh nodes (SLURM carries everything)
#   OMP_NUM_THREADS        default: the node's CPUs / ranks per node (SLURM_CPUS_ON_NODE or nproc)
#   DEEPSPEED_TIMEOUT=60   minutes a collective may wait (DeepSpeed's default, 10, kills ranks waiting on a
#                          long checkpoint save of rank 0)
#   NCCL_SOCKET_IFNAME     passed through; also used for GLOO_SOCKET_IFNAME (CPU/gloo) unless that is set
#   NCCL_*, GLOO_*, TORCH_*, HF_*, TRANSFORMERS_*, HIDDENKEY_DS_*, HKDS_*, PYTHONPATH: carried to hostfile nodes
#                          (names containing TOKEN, SECRET, PASSWORD or API_KEY are not put on an ssh command line)
#
# Logs: RUN_DIR/logs/node<R>.log (what node R's launcher printed, with local rank 0's output) and
# RUN_DIR/logs/rank<N>.log (everything rank N printed), where RUN_DIR is the recipe's run.output_dir after
# overrides. The exit status is the training's: the first failing rank's code (SLURM: the highest task code).
set -euo pipefail

# This file is two programs, each in its own section below and ending in its own main; the last lines pick one.
#   host_main  (section 3) the batch host, what users run: finds the nodes (this machine, a hostfile, a SLURM
#              allocation), resolves the run directory, and starts the node launcher on every node (over
#              pdsh/ssh, or through srun), or runs this machine's ranks itself in local mode. --dry-run prints
#              every node's command instead.
#   node_main  (section 2) one node of a hostfile: `launch.sh --hostfile FILE --node-rank R ...` (how srun and
#              ssh start it on each node, and how a user starts nodes by hand) runs node R's ranks through
#              DeepSpeed's runner, logged. rank_main, beside it, wraps each of those ranks (--rank-exec).
# Section 1 is what both read the same way: the options, the interpreter, the hostfile, the run directory.
# Both programs are this one file so that the single path find_self resolves reaches either on every node.

# == 1. shared by both programs ====================================================================================
die() { printf 'launch.sh: %s\n' "$*" >&2; exit 2; }
quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; printf '%s' "${out% }"; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

usage() { sed -n '/^# launch.sh \[options\]/,/^set -euo pipefail/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }

# The path of this script on every node. sbatch runs a spooled copy (slurmd's .../slurm_script), so there
# the submitted file is found from the job record; srun and the rank wrapper need the real file.
find_self() {
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
    if [[ -n ${HKDS_LAUNCH:-} ]]; then
        here=$HKDS_LAUNCH
    elif [[ -n ${SLURM_JOB_ID:-} && $(basename "$here") != launch.sh ]]; then
        local cmd=""
        if command -v scontrol >/dev/null; then
            cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^[[:space:]]*Command=\([^[:space:]]*\).*/\1/p' | head -n 1)
        fi
        if [[ -n $cmd && -f $cmd ]]; then
            here=$cmd
        elif [[ -f ${SLURM_SUBMIT_DIR:-}/launch.sh ]]; then
            here=$SLURM_SUBMIT_DIR/launch.sh
        else
            die "running as a SLURM batch copy ($here) and cannot find the submitted launch.sh (hint: export HKDS_LAUNCH=/path/to/launch.sh)"
        fi
    fi
    [[ -x $here ]] || die "$here is not executable (hint: chmod +x $here)"
    printf '%s' "$here"
}

# The command line -> DRY_RUN HOSTFILE NODE_RANK MASTER_ADDR_OPT MASTER_PORT_OPT MODE RUN_DIR RECIPE TRAIN_ARGS
need_value() { [[ $# -ge 2 ]] || die "$1 needs a value"; }
parse_options() {
    DRY_RUN=0 HOSTFILE="" NODE_RANK="" NODE_RANK_ENV="" MASTER_ADDR_OPT="" MASTER_PORT_OPT="" MODE=${HKDS_MODE:-}
    RUN_DIR=""
    while [[ $# -gt 0 ]]; do
        case $1 in
            --dry-run) DRY_RUN=1; shift ;;
            --hostfile) need_value "$@"; HOSTFILE=$2; shift 2 ;;
            --hostfile=*) HOSTFILE=${1#*=}; shift ;;
            --node-rank) need_value "$@"; NODE_RANK=$2; shift 2 ;;
            --node-rank=*) NODE_RANK=${1#*=}; shift ;;
            --node-rank-env) need_value "$@"; NODE_RANK_ENV=$2; shift 2 ;;   # internal: srun's per-node step
            --master-addr) need_value "$@"; MASTER_ADDR_OPT=$2; shift 2 ;;
            --master-addr=*) MASTER_ADDR_OPT=${1#*=}; shift ;;
            --master-port) need_value "$@"; MASTER_PORT_OPT=$2; shift 2 ;;
            --master-port=*) MASTER_PORT_OPT=${1#*=}; shift ;;
            --mode) need_value "$@"; MODE=$2; shift 2 ;;
            --mode=*) MODE=${1#*=}; shift ;;
            --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;               # internal: resolved once, passed down
            -h|--help) usage; exit 0 ;;
            --) shift; break ;;
            -*) die "unknown option $1 (launch options go before RECIPE.yaml; see launch.sh --help)" ;;
            *) break ;;
        esac
    done
    [[ $# -ge 1 ]] || die "no recipe given (usage: launch.sh [options] RECIPE.yaml [key=value ...])"
    RECIPE=$1
    shift
    TRAIN_ARGS=("$@")

    if [[ -n $NODE_RANK_ENV ]]; then
        [[ -n ${!NODE_RANK_ENV:-} ]] || die "--node-rank-env $NODE_RANK_ENV: that variable is not set on $(hostname)"
        NODE_RANK=${!NODE_RANK_ENV}
        # srun's step is a hostfile node, whatever HKDS_MODE the job exports (srun carries every variable)
        MODE=hostfile
    fi
    [[ -z $NODE_RANK ]] || is_uint "$NODE_RANK" || die "--node-rank must be a whole number >= 0, got '$NODE_RANK'"
    [[ -z $NODE_RANK || -n $HOSTFILE ]] || die "--node-rank needs --hostfile (the nodes and their slots)"
}

pick_mode() {  # MODE: as given, else from --hostfile / SLURM_JOB_ID
    if [[ -z $MODE ]]; then
        if [[ -n $HOSTFILE ]]; then MODE=hostfile
        elif [[ -n ${SLURM_JOB_ID:-} ]]; then MODE=slurm
        else MODE=local
        fi
    fi
    case $MODE in
        local) [[ -z $HOSTFILE ]] || die "--mode local takes no --hostfile" ;;
        hostfile) [[ -n $HOSTFILE ]] || die "--mode hostfile needs --hostfile FILE" ;;
        slurm) [[ -z $HOSTFILE ]] || die "--mode slurm builds its own hostfile from the allocation; drop --hostfile"
               [[ -n ${SLURM_JOB_ID:-} ]] ||
                   die "--mode slurm needs a SLURM allocation (run it under sbatch or salloc)" ;;
        *) die "--mode must be local, hostfile or slurm, got '$MODE'" ;;
    esac
}

resolve_runtime() {  # PY, TRAIN_MODULE, MASTER_PORT_VALUE
    # the interpreter's real path (not a pyenv/conda shim), the same on every node
    PY=$("${HKDS_PYTHON:-python3}" -c 'import sys; print(sys.executable)') ||
        die "cannot run Python '${HKDS_PYTHON:-python3}' (hint: set HKDS_PYTHON to the interpreter with hiddenkey_ds)"
    export HKDS_PYTHON=$PY
    TRAIN_MODULE=${HKDS_TRAIN_MODULE:-hiddenkey_ds.train}
    [[ $TRAIN_MODULE =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] ||
        die "HKDS_TRAIN_MODULE must be a dotted module name, got '$TRAIN_MODULE'"

    MASTER_PORT_VALUE=${MASTER_PORT_OPT:-${MASTER_PORT:-}}
    if [[ -z $MASTER_PORT_VALUE ]]; then
        # jobs sharing a node must not share a port: derive it from the job id under SLURM
        MASTER_PORT_VALUE=29500
        [[ $MODE != slurm ]] || MASTER_PORT_VALUE=$((29500 + SLURM_JOB_ID % 10000))
    fi
    is_uint "$MASTER_PORT_VALUE" && ((MASTER_PORT_VALUE > 0 && MASTER_PORT_VALUE < 65536)) ||
        die "master port must be 1..65535, got '$MASTER_PORT_VALUE'"
}

# --hostfile (DeepSpeed's format: "hostname slots=N", # comments) -> HOSTS[] SLOTS[] WORLD MASTER_ADDR_VALUE, and
# HOSTFILE made absolute (it is passed on to DeepSpeed's runner and to the other nodes)
HOSTS=() SLOTS=() WORLD=0
read_hostfile() {
    [[ -f $HOSTFILE ]] || die "hostfile $HOSTFILE does not exist"
    local line host slots n=0 h
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%%#*}
        [[ $line =~ ^[[:space:]]*$ ]] && continue
        if [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]]; then
            host=${BASH_REMATCH[1]} slots=${BASH_REMATCH[2]}
            ((slots >= 1)) || die "$HOSTFILE:$n: $host has slots=0"
            for h in "${HOSTS[@]}"; do [[ $h != "$host" ]] || die "$HOSTFILE:$n: $host is listed twice"; done
            HOSTS+=("$host") SLOTS+=("$slots")
        else
            die "$HOSTFILE:$n: expected 'hostname slots=N', got '$line'"
        fi
    done <"$HOSTFILE"
    ((${#HOSTS[@]} > 0)) || die "hostfile $HOSTFILE lists no hosts"
    HOSTFILE=$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")
    local s
    for s in "${SLOTS[@]}"; do WORLD=$((WORLD + s)); done
    MASTER_ADDR_VALUE=${MASTER_ADDR_OPT:-${MASTER_ADDR:-${HOSTS[0]}}}
}

resolve_run_dir() {  # RUN_DIR (unless --run-dir gave it) and LOG_DIR
    if [[ -z $RUN_DIR ]]; then
        # the recipe decides it (run.output_dir after overrides); loading it here also fails fast on a bad recipe,
        # checked against the world size about to start
        RUN_DIR=$("$PY" - "$RECIPE" "$WORLD" "${TRAIN_ARGS[@]}" <<'EOF'
import os, sys
from hiddenkey_ds.config import RecipeError, load_recipe
try:
    recipe = load_recipe(sys.argv[1], sys.argv[3:], world_size=int(sys.argv[2]), check_output_dir=False)
except RecipeError as err:
    print(f"launch.sh: {err}", file=sys.stderr)
    sys.exit(2)
print(os.path.abspath(recipe.run.output_dir))
EOF
) || exit $?
    fi
    LOG_DIR=$RUN_DIR/logs
}

header() {
    printf '# hiddenkey-ds launch: mode=%s nodes=%s world=%s master=%s:%s\n' \
        "$MODE" "${#HOSTS[@]}" "$WORLD" "$MASTER_ADDR_VALUE" "$MASTER_PORT_VALUE"
    printf '# run dir: %s (logs: %s)\n' "$RUN_DIR" "$LOG_DIR"
}

# Run "$@" in its own process group with output appended to $1-named log, forwarding INT/TERM to the whole
# group (runner, per-node launcher, ranks), and return its exit status.
run_logged() {
    local log=$1 child rc=0
    shift
    mkdir -p "$(dirname "$log")"
    printf '=== %s %s: %s\n' "$(date '+%F %T')" "$(hostname)" "$(quote "$@")" >>"$log"
    if command -v setsid >/dev/null; then
        setsid "$@" > >(tee -a "$log") 2>&1 &
    else
        "$@" > >(tee -a "$log") 2>&1 &
    fi
    child=$!
    trap 'kill -TERM -- -'"$child"' 2>/dev/null || kill -TERM '"$child"' 2>/dev/null || true' INT TERM
    while :; do
        rc=0
        wait "$child" || rc=$?
        # a trapped signal interrupts wait with 128+n while the child is still shutting down: wait again
        kill -0 "$child" 2>/dev/null || break
    done
    trap - INT TERM
    return "$rc"
}

# == 2. the per-node launcher: one node's ranks through DeepSpeed's runner =========================================
# Reads PY TRAIN_MODULE RECIPE TRAIN_ARGS MASTER_ADDR_VALUE MASTER_PORT_VALUE LOG_DIR DRY_RUN SELF, and for node R of
# a hostfile NODE_HOSTFILE and SLOTS[R]; for this machine alone (node "local") LOCAL_RANKS and DEVICE.

# `launch.sh --rank-exec LOGDIR -- CMD...`, run by deepspeed's per-node launcher once per rank: tees the rank's
# output to LOGDIR/rank$RANK.log; local rank 0 also prints to the node's console. exec keeps CMD's exit status as
# the rank's.
rank_main() {
    [[ $# -ge 4 && $3 == -- ]] || die "usage: launch.sh --rank-exec LOGDIR -- CMD [ARGS...]"
    local logdir=$2 log
    shift 3
    log="$logdir/rank${RANK:?RANK is not set: --rank-exec runs under deepspeed.launcher.launch}.log"
    mkdir -p "$logdir"
    if [[ -n ${HKDS_NODE_VISIBLE_DEVICES:-} && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        # deepspeed's launcher numbers a hostfile node's GPUs 0..slots-1 and overwrites CUDA_VISIBLE_DEVICES
        # with those; map them back onto the devices this node was given (SLURM's or the caller's list)
        local given picked mapped=() i
        IFS=, read -ra given <<<"$HKDS_NODE_VISIBLE_DEVICES"
        IFS=, read -ra picked <<<"$CUDA_VISIBLE_DEVICES"
        for i in "${picked[@]}"; do mapped+=("${given[$i]:?local device $i is not in HKDS_NODE_VISIBLE_DEVICES=$HKDS_NODE_VISIBLE_DEVICES}"); done
        CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${mapped[*]}")
        export CUDA_VISIBLE_DEVICES
    fi
    printf '=== %s rank %s (local %s of %s) on %s: %s\n' "$(date '+%F %T')" "$RANK" "${LOCAL_RANK:-?}" \
        "${LOCAL_SIZE:-?}" "$(hostname)" "$(quote "$@")" >>"$log"
    if [[ ${LOCAL_RANK:-0} == 0 ]]; then
        exec > >(tee -a "$log") 2>&1
    else
        exec >>"$log" 2>&1
    fi
    exec "$@"
}

# NODE_ENV + NODE_CMD: deepspeed's runner for this node's ranks (the runner starts one process per slot through
# deepspeed.launcher.launch, each running rank_main around `python -u -m hiddenkey_ds.train`).
node_command() {  # $1 = node rank or "local"; fills NODE_ENV and NODE_CMD
    local rank=$1 ranks_here cpus
    NODE_ENV=() NODE_CMD=("$PY" -m deepspeed.launcher.runner)
    if [[ $rank == local ]]; then
        ranks_here=$LOCAL_RANKS
        # without a GPU the runner would count NUMA nodes; --num_gpus sets the rank count (all GPUs otherwise,
        # honouring CUDA_VISIBLE_DEVICES)
        [[ $DEVICE == gpu ]] || NODE_CMD+=(--num_gpus "$LOCAL_RANKS")
        NODE_CMD+=(--master_addr "$MASTER_ADDR_VALUE")
    else
        ranks_here=${SLOTS[$rank]}
        NODE_CMD+=(--hostfile "$NODE_HOSTFILE" --no_ssh --node_rank "$rank" --master_addr "$MASTER_ADDR_VALUE")
        local devs=${CUDA_VISIBLE_DEVICES:-}
        devs=${devs//[[:space:]]/}
        if [[ -n $devs && $devs != -1* ]]; then
            local n_devs
            n_devs=$(tr ',' '\n' <<<"$devs" | grep -c .)
            ((n_devs >= ranks_here)) ||
                die "node $rank has $ranks_here slots but CUDA_VISIBLE_DEVICES=$devs names only $n_devs device(s)"
            NODE_ENV+=("HKDS_NODE_VISIBLE_DEVICES=$devs")
        fi
    fi
    NODE_CMD+=(--master_port "$MASTER_PORT_VALUE" --no_local_rank --no_python
               "$SELF" --rank-exec "$LOG_DIR" -- "$PY" -u -m "$TRAIN_MODULE" "$RECIPE" "${TRAIN_ARGS[@]}")
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
        NODE_ENV+=("OMP_NUM_THREADS=$(( cpus / ranks_here > 0 ? cpus / ranks_here : 1 ))")
    fi
    [[ -n ${DEEPSPEED_TIMEOUT:-} ]] || NODE_ENV+=(DEEPSPEED_TIMEOUT=60)
    if [[ -n ${NCCL_SOCKET_IFNAME:-} && -z ${GLOO_SOCKET_IFNAME:-} ]]; then
        NODE_ENV+=("GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME")
    fi
    [[ -n ${PYTHONFAULTHANDLER:-} ]] || NODE_ENV+=(PYTHONFAULTHANDLER=1)  # tracebacks of hung/crashed ranks
}

print_node() {  # $1 = label; prints "# label" and the exact command
    printf '# %s\n' "$1"
    if ((${#NODE_ENV[@]})); then
        printf 'env %s %s\n' "$(quote "${NODE_ENV[@]}")" "$(quote "${NODE_CMD[@]}")"
    else
        printf '%s\n' "$(quote "${NODE_CMD[@]}")"
    fi
}

run_node() {  # $1 = node rank or "local": runs the node's ranks (with --dry-run: prints the command)
    local rank=$1 label rc=0
    node_command "$rank"
    if [[ $rank == local ]]; then label="node 0 ($(hostname), $LOCAL_RANKS $DEVICE ranks)"; rank=0
    else label="node $rank (${HOSTS[$rank]}, ${SLOTS[$rank]} ranks)"
    fi
    if ((DRY_RUN)); then print_node "$label"; return 0; fi
    run_logged "$LOG_DIR/node$rank.log" env "${NODE_ENV[@]}" "${NODE_CMD[@]}" || rc=$?
    if ((rc != 0)); then
        printf 'launch.sh: training exited with status %s on node %s; per-rank logs: %s/rank*.log\n' \
            "$rc" "$rank" "$LOG_DIR" >&2
    fi
    return "$rc"
}

node_main() {  # `launch.sh --hostfile FILE --node-rank R [options] RECIPE.yaml ...`
    read_hostfile
    ((NODE_RANK < ${#HOSTS[@]})) ||
        die "--node-rank $NODE_RANK but $HOSTFILE lists ${#HOSTS[@]} node(s) (ranks 0..$((${#HOSTS[@]} - 1)))"
    resolve_run_dir
    NODE_HOSTFILE=$HOSTFILE
    if ((DRY_RUN)); then header; fi
    run_node "$NODE_RANK"
}

# == 3. the batch host: finds the nodes, starts the node launcher on each ==========================================

count_local_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
        local devs=${CUDA_VISIBLE_DEVICES//[[:space:]]/}
        if [[ -z $devs || $devs == -1* ]]; then echo 0; else tr ',' '\n' <<<"$devs" | grep -c .; fi
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 0
    fi
}

cpu_ranks() {
    local n=${HKDS_CPU_RANKS:-2}
    is_uint "$n" && ((n >= 1)) || die "HKDS_CPU_RANKS must be a whole number >= 1, got '$n'"
    echo "$n"
}

# ranks per node under SLURM: the allocation's GPUs per node, else its tasks per node (CPU jobs), else HKDS_CPU_RANKS
slurm_ranks_per_node() {
    local g=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $g && -n ${SLURM_GPUS_PER_NODE:-} ]]; then g=${SLURM_GPUS_PER_NODE##*:}; fi  # "4" or "a100:4"
    if [[ -z $g && -n ${SLURM_JOB_GPUS:-} ]]; then g=$(tr ',' '\n' <<<"$SLURM_JOB_GPUS" | grep -c .); fi
    if [[ -z $g ]]; then g=$(count_local_gpus); fi
    is_uint "$g" || die "cannot read GPUs per node from SLURM (got '$g')"
    if ((g > 0)); then echo "$g"; return; fi
    local t=${SLURM_NTASKS_PER_NODE:-}
    [[ -n $t ]] || t=${SLURM_TASKS_PER_NODE:-}
    t=${t%%[^0-9]*}   # "4(x2),3" -> 4
    if [[ -n $t ]] && ((t > 1)); then echo "$t"; else cpu_ranks; fi
}

read_local_machine() {  # local mode -> LOCAL_RANKS DEVICE WORLD MASTER_ADDR_VALUE
    local ngpu
    ngpu=$(count_local_gpus)
    if ((ngpu > 0)); then LOCAL_RANKS=$ngpu DEVICE=gpu; else LOCAL_RANKS=$(cpu_ranks) DEVICE=cpu; fi
    WORLD=$LOCAL_RANKS
    MASTER_ADDR_VALUE=${MASTER_ADDR_OPT:-127.0.0.1}
}

read_slurm_allocation() {  # SLURM mode -> HOSTS[] SLOTS[] WORLD MASTER_ADDR_VALUE
    command -v scontrol >/dev/null || die "SLURM mode needs scontrol on PATH"
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}} rpn
    [[ -n $nodelist ]] || die "SLURM_JOB_NODELIST is not set: is this an sbatch/salloc shell?"
    mapfile -t HOSTS < <(scontrol show hostnames "$nodelist")
    ((${#HOSTS[@]} > 0)) || die "scontrol show hostnames '$nodelist' printed no host"
    rpn=$(slurm_ranks_per_node)
    SLOTS=()
    for _ in "${HOSTS[@]}"; do SLOTS+=("$rpn"); done
    WORLD=$((rpn * ${#HOSTS[@]}))
    MASTER_ADDR_VALUE=${MASTER_ADDR_OPT:-$(slurm_node_addr "${HOSTS[0]}")}
}

# A node's address as SLURM knows it (its NodeAddr), not its name: node names need not resolve on the nodes
# (a cluster whose names live only in slurm.conf). Falls back to the name where scontrol gives no address.
slurm_node_addr() {
    local addr
    addr=$(scontrol show node "$1" 2>/dev/null | sed -n 's/.*NodeAddr=\([^[:space:]]*\).*/\1/p' | head -n 1) || addr=""
    if [[ -n $addr && $addr != "(null)" ]]; then echo "$addr"; else echo "$1"; fi
}

# Variables carried to pdsh/ssh nodes (SLURM's srun carries the whole environment itself).
carried_env() {
    local name
    CARRIED=("HKDS_PYTHON=$PY" "HKDS_LAUNCH=$SELF")
    for name in $(compgen -e | LC_ALL=C sort); do
        case $name in
            HKDS_PYTHON|HKDS_LAUNCH|HKDS_MODE) continue ;;
            NCCL_*|GLOO_*|TORCH_*|HF_*|TRANSFORMERS_*|HIDDENKEY_DS_*|HKDS_*|PYTHONPATH|OMP_NUM_THREADS|DEEPSPEED_*|CUDA_LAUNCH_BLOCKING) ;;
            *) [[ " ${HKDS_EXPORT:-} " == *" $name "* ]] || continue ;;
        esac
        if [[ $name =~ (TOKEN|SECRET|PASSWORD|API_KEY) ]]; then
            printf 'launch.sh: not carrying %s to other nodes on an ssh command line (set it there)\n' "$name" >&2
            continue
        fi
        CARRIED+=("$name=${!name}")
    done
}

remote_cmd() {  # $1 = node rank (or pdsh's %n); node_main's command line for the remote login shell
    local node_args=(--hostfile "$HOSTFILE" --master-addr "$MASTER_ADDR_VALUE" --master-port "$MASTER_PORT_VALUE"
                     --run-dir "$RUN_DIR")
    printf 'cd %s && exec env %s %s %s %s' "$(quote "$PWD")" "$(quote "${CARRIED[@]}")" "$(quote "$SELF")" \
        "$(quote "${node_args[@]}" --node-rank "$1")" "$(quote "$RECIPE" "${TRAIN_ARGS[@]}")"
}

run_local() {
    HOSTS=("$(hostname)")
    header
    run_node local
}

fan_out_hostfile() {  # every node of the hostfile runs node_main with its node rank, in this directory
    local remote=${HKDS_REMOTE:-} hostlist fan=() r rc worst=0
    carried_env
    if [[ -z $remote ]]; then if command -v pdsh >/dev/null; then remote=pdsh; else remote=ssh; fi; fi
    header
    hostlist=$(IFS=,; echo "${HOSTS[*]}")
    if [[ $remote == pdsh ]]; then
        # pdsh replaces %n by each host's index in -w (DeepSpeed's runner relies on the same), -S returns the
        # largest exit status of the nodes
        fan=(pdsh -S -f 1024 -R ssh -w "$hostlist" "$(remote_cmd %n)")
    elif [[ $remote != ssh ]]; then
        die "HKDS_REMOTE must be pdsh or ssh, got '$remote'"
    fi
    NODE_HOSTFILE=$HOSTFILE
    if ((DRY_RUN)); then
        if [[ $remote == pdsh ]]; then printf '# this host runs:\n%s\n' "$(quote "${fan[@]}")"
        else
            for r in "${!HOSTS[@]}"; do
                printf '# this host runs:\n%s\n' "$(quote ssh -o BatchMode=yes "${HOSTS[$r]}" "$(remote_cmd "$r")")"
            done
        fi
        for r in "${!HOSTS[@]}"; do run_node "$r"; done
        return 0
    fi
    mkdir -p "$LOG_DIR"
    if [[ $remote == pdsh ]]; then
        run_logged "$LOG_DIR/launcher.log" env PDSH_RCMD_TYPE=ssh "${fan[@]}"
        return
    fi
    SSH_PIDS=()
    for r in "${!HOSTS[@]}"; do
        ssh -o BatchMode=yes "${HOSTS[$r]}" "$(remote_cmd "$r")" &
        SSH_PIDS+=($!)
    done
    trap 'kill -TERM "${SSH_PIDS[@]}" 2>/dev/null || true' INT TERM
    for r in "${SSH_PIDS[@]}"; do rc=0; wait "$r" || rc=$?; ((rc > worst)) && worst=$rc; done
    return "$worst"
}

fan_out_slurm() {  # one srun step, one task per node, each running node_main with its SLURM_NODEID
    local step r
    NODE_HOSTFILE=$LOG_DIR/hostfile
    step=(srun --nodes="${#HOSTS[@]}" --ntasks="${#HOSTS[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL)
    # srun (Slurm >= 22.05) does not inherit sbatch's --cpus-per-task: without it the launcher gets 1 CPU
    [[ -z ${SLURM_CPUS_PER_TASK:-} ]] || step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    step+=("$SELF" --hostfile "$NODE_HOSTFILE" --node-rank-env SLURM_NODEID --master-addr "$MASTER_ADDR_VALUE"
           --master-port "$MASTER_PORT_VALUE" --run-dir "$RUN_DIR" "$RECIPE" "${TRAIN_ARGS[@]}")
    header
    if ((DRY_RUN)); then
        printf '# hostfile %s:\n' "$NODE_HOSTFILE"
        for r in "${!HOSTS[@]}"; do printf '#   %s slots=%s\n' "${HOSTS[$r]}" "${SLOTS[$r]}"; done
        printf '# the batch host runs:\n%s\n' "$(quote "${step[@]}")"
        for r in "${!HOSTS[@]}"; do run_node "$r"; done
        return 0
    fi
    command -v srun >/dev/null || die "SLURM mode needs srun on PATH"
    mkdir -p "$LOG_DIR"
    for r in "${!HOSTS[@]}"; do printf '%s slots=%s\n' "${HOSTS[$r]}" "${SLOTS[$r]}"; done >"$NODE_HOSTFILE.tmp"
    mv "$NODE_HOSTFILE.tmp" "$NODE_HOSTFILE"
    export MASTER_ADDR=$MASTER_ADDR_VALUE MASTER_PORT=$MASTER_PORT_VALUE
    run_logged "$LOG_DIR/launcher.log" "${step[@]}"
}

host_main() {  # `launch.sh [options] RECIPE.yaml ...` without --node-rank
    case $MODE in
        local) read_local_machine ;;
        hostfile) read_hostfile ;;
        slurm) read_slurm_allocation ;;
    esac
    resolve_run_dir
    case $MODE in
        local) run_local ;;
        hostfile) fan_out_hostfile ;;
        slurm) fan_out_slurm ;;
    esac
}

# == main: pick the program ========================================================================================
if [[ ${1:-} == --rank-exec ]]; then
    rank_main "$@"   # before find_self: a rank needs no job record lookup
fi
SELF=$(find_self)
parse_options "$@"
pick_mode
resolve_runtime
if [[ -n $NODE_RANK ]]; then
    node_main
else
    host_main
fi
