# shellcheck shell=bash
# Shared by the tpu/ scripts (sourced, never run): settings, flag parsing, --dry-run, and the steps
# that several scripts take (bring a queued resource to ACTIVE, install the project, launch a job).
#
# Dry-run contract: every command that creates, changes or deletes something goes through `run`
# and is printed instead (one per line, shell-quoted); read-only `describe` queries still run,
# because what resume.sh or create.sh would do depends on the queued resource's current state.

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "${0##*/}: needs bash >= 4.4, found ${BASH_VERSION} (on macOS: brew install bash)" >&2
  exit 1
fi

PROG=tpu/${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Settings: flags override these environment variables.
TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_PROJECT=${TPU_PROJECT:-}
TPU_TYPE=${TPU_TYPE:-}
TPU_RUNTIME=${TPU_RUNTIME:-}
TPU_PROVISIONING=${TPU_PROVISIONING:-spot}
TPU_WAIT_TIMEOUT=${TPU_WAIT_TIMEOUT:-7200}
TPU_POLL_INTERVAL=${TPU_POLL_INTERVAL:-30}
ICOT_REPO=${ICOT_REPO:-}
ICOT_REF=${ICOT_REF:-main}
ICOT_SRC=${ICOT_SRC:-$REPO_ROOT}
ICOT_REMOTE_DIR=${ICOT_REMOTE_DIR:-icot-jax}
ICOT_PYTHON=${ICOT_PYTHON:-python3}
ICOT_AFTER_INSTALL=${ICOT_AFTER_INSTALL:-}
ICOT_RUN_DIR=${ICOT_RUN_DIR:-}
DRY_RUN=0
NO_WAIT=0
RESTART=0
JOB_ENV=()

# Paths on every worker, relative to ICOT_REMOTE_DIR (the job's log and process-group id) or home.
REMOTE_LOG=logs/icot.log
REMOTE_PID=logs/icot.pid
REMOTE_TARBALL=icot-jax-src.tar.gz

ICOT_TMP=$(mktemp -d)
trap 'rm -rf "$ICOT_TMP"' EXIT

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Flags. Each is registered once with its variable and help; --help is generated from the table.

declare -A FLAG_VAR=() FLAG_KIND=() FLAG_HELP=() FLAG_METAVAR=()
FLAG_ORDER=()

flag() {  # FLAG VAR KIND HELP [METAVAR]: KIND is "value" (VAR=next argument), "switch" (VAR=1)
  # or "list" (append to the array VAR); METAVAR names the value in --help (default: VAR's suffix).
  [[ -n ${FLAG_VAR[$1]:-} ]] || FLAG_ORDER+=("$1")
  FLAG_VAR[$1]=$2 FLAG_KIND[$1]=$3 FLAG_HELP[$1]=$4 FLAG_METAVAR[$1]=${5:-${2#*_}}
}

print_flags() {  # the options part of --help, with each setting's environment variable and value
  local name var help
  echo "Options:"
  for name in "${FLAG_ORDER[@]}"; do
    var=${FLAG_VAR[$name]} help=${FLAG_HELP[$name]}
    [[ ${FLAG_KIND[$name]} == switch ]] || name+=" ${FLAG_METAVAR[$name]}"
    if [[ $var == TPU_* || $var == ICOT_* ]]; then
      help+=" [\$$var${!var:+, now: ${!var}}]"
    fi
    printf '  %-28s %s\n' "$name" "$help"
  done
  printf '  %-28s %s\n' "-h, --help" "show this help"
}

parse_args() {  # ARGS...: set the registered flags' variables; positional arguments go to ARGS
  ARGS=()
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --) shift; ARGS+=("$@"); return ;;
      --*=*) set_flag "${1%%=*}" "${1#*=}"; shift ;;
      --*)
        case ${FLAG_KIND[$1]:-} in
          "") die "unknown option $1 (see $PROG --help)" ;;
          switch) set_flag "$1"; shift ;;
          *)
            (($# >= 2)) || die "$1 needs a value (see $PROG --help)"
            set_flag "$1" "$2"; shift 2 ;;
        esac ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
}

set_flag() {  # FLAG [VALUE]
  local var=${FLAG_VAR[$1]:-}
  [[ -n $var ]] || die "unknown option $1 (see $PROG --help)"
  case ${FLAG_KIND[$1]} in
    switch) (($# == 1)) || die "$1 takes no value"; printf -v "$var" 1 ;;
    value) printf -v "$var" '%s' "$2" ;;
    list) local -n items=$var; items+=("$2") ;;
  esac
}

no_positional() {
  ((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (see $PROG --help)"
}

flag_of() {  # VAR: print the flag that sets VAR
  local name
  for name in "${!FLAG_VAR[@]}"; do
    [[ ${FLAG_VAR[$name]} != "$1" ]] || { echo "$name"; return; }
  done
}

require() {  # VAR WHAT: fail, naming the flag and the variable that set VAR, when VAR is empty
  [[ -n ${!1} ]] || die "missing $2: pass $(flag_of "$1") or set $1"
}

require_uint() {  # VAR: fail unless VAR is a whole number of seconds
  [[ ${!1} =~ ^[0-9]+$ ]] || die "$(flag_of "$1") ($1) must be a whole number of seconds, got '${!1}'"
}

flag --name TPU_NAME value "queued resource and node name"
flag --zone TPU_ZONE value "zone, e.g. us-central2-b"
flag --project TPU_PROJECT value "Google Cloud project"
flag --dry-run DRY_RUN switch "print the commands that would change something instead of running them"

node_flags() {  # flags for creating a node: create.sh and resume.sh
  flag --type TPU_TYPE value "accelerator type: v5p-8, v4-16, v5litepod-16, v6e-8, ..."
  flag --runtime TPU_RUNTIME value "TPU software version (default: the recommended one for --type)"
  flag --provisioning TPU_PROVISIONING value "spot, on-demand, reserved or best-effort" MODEL
  flag --timeout TPU_WAIT_TIMEOUT value "seconds to wait for the node to become ACTIVE" SECONDS
  flag --poll-interval TPU_POLL_INTERVAL value "seconds between two state queries" SECONDS
}

remote_dir_flag() {  # where the project lives on the workers: every script that ssh-es into them
  flag --remote-dir ICOT_REMOTE_DIR value "project directory on each worker (relative to home, or absolute)" DIR
}

install_flags() {  # flags for installing the project: setup.sh and resume.sh
  flag --repo ICOT_REPO value "git URL to clone on the workers (default: copy the local checkout --src)" URL
  flag --ref ICOT_REF value "branch, tag or commit to check out with --repo"
  flag --src ICOT_SRC value "local git checkout to copy when no --repo is given" DIR
  flag --python ICOT_PYTHON value "python on the workers that creates the venv"
  flag --after-install ICOT_AFTER_INSTALL value \
    "shell command run next in the project directory of every worker, e.g. to fetch data" CMD
  remote_dir_flag
}

job_flags() {  # flags for starting a job: launch.sh and resume.sh
  flag --run-dir ICOT_RUN_DIR value "run directory on shared storage (gs://bucket/path)" GS_PATH
  flag --env JOB_ENV list "environment variable for the job (repeatable)" KEY=VALUE
  flag --restart RESTART switch "stop a job still running on the workers instead of refusing"
  remote_dir_flag
}

# ---------------------------------------------------------------------------------------------
# Running commands.

shell_quote() {  # ARGS...: print them as one line a shell reads back as the same words
  local out=() arg q="'\\''"
  for arg; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/$q}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

run() {  # CMD...: run a command that changes something, or only print it under --dry-run
  if ((DRY_RUN)); then
    shell_quote "$@"
  else
    printf '+ %s\n' "$(shell_quote "$@")" >&2
    "$@"
  fi
}

run_line() {  # LINE: like run, for a pipeline written as one shell-quoted line. It is evaluated
  # from the very string --dry-run prints, so what is printed is what runs.
  if ((DRY_RUN)); then
    printf '%s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
    eval "$1"
  fi
}

check_location() {  # every script: which node, where; sets LOCATION and QR_DESCRIBE
  require TPU_NAME "TPU name"
  require TPU_ZONE "zone"
  require TPU_PROJECT "project"
  LOCATION=(--zone="$TPU_ZONE" --project="$TPU_PROJECT")
  QR_DESCRIBE=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
    --format='value(state.state)')
}

join_statements() {  # STATEMENTS...: one line of shell for ssh --command, so that --dry-run prints
  # one line per command. Newlines are dropped: a long statement wraps with its space on the next line.
  local line
  printf -v line '%s; ' "$@"
  line=${line%; }
  printf '%s\n' "${line//$'\n'/}"
}

on_workers() {  # WORKERS COMMAND: run COMMAND over ssh on the workers (all, N, 1-3, ...)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

# ---------------------------------------------------------------------------------------------
# The queued resource: one node named like the queued resource itself.

check_node_settings() {  # validate everything create_node needs before anything is changed
  require TPU_TYPE "accelerator type"
  require_uint TPU_WAIT_TIMEOUT
  require_uint TPU_POLL_INTERVAL
  case $TPU_PROVISIONING in
    spot | on-demand | reserved | best-effort) ;;
    *) die "unknown provisioning '$TPU_PROVISIONING' (--provisioning or TPU_PROVISIONING):" \
      "expected spot, on-demand, reserved or best-effort" ;;
  esac
  [[ -n $TPU_RUNTIME ]] && return
  # The versions recommended by the Cloud TPU docs ("TPU software versions") for JAX.
  case $TPU_TYPE in
    v6e-*) TPU_RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) TPU_RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*) TPU_RUNTIME=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) TPU_RUNTIME=tpu-ubuntu2204-base ;;
    *) die "no default runtime for accelerator type '$TPU_TYPE': pass --runtime or set TPU_RUNTIME" ;;
  esac
}

qr_state() {  # print the queued resource's state (ACTIVE, SUSPENDED, ...) or NOT_FOUND
  local err=$ICOT_TMP/describe.err state
  if state=$("${QR_DESCRIBE[@]}" 2>"$err"); then
    printf '%s\n' "${state:-STATE_UNSPECIFIED}"
  elif grep -q NOT_FOUND "$err"; then
    echo NOT_FOUND
  else
    cat "$err" >&2
    die "could not read the state of queued resource $TPU_NAME: $(shell_quote "${QR_DESCRIBE[@]}")"
  fi
}

create_node() {
  local cmd=(gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME"
    "${LOCATION[@]}" --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_RUNTIME")
  case $TPU_PROVISIONING in
    spot) cmd+=(--spot) ;;
    reserved) cmd+=(--reserved) ;;
    # The best-effort tier only exists in the alpha API.
    best-effort) cmd=(gcloud alpha "${cmd[@]:1}" --best-effort) ;;
  esac
  run "${cmd[@]}"
}

delete_node() {  # delete the queued resource and its node. gcloud must not prompt (--quiet):
  # teardown.sh asks first, and resume.sh only deletes what a preemption or failure left.
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
}

wait_for_state() {  # TARGET: poll until the queued resource is TARGET (ACTIVE or NOT_FOUND)
  local target=$1 state last='' deadline=$((SECONDS + TPU_WAIT_TIMEOUT))
  if ((DRY_RUN)); then
    shell_quote "${QR_DESCRIBE[@]}"
    return
  fi
  while :; do
    state=$(qr_state)
    [[ $state == "$last" ]] || log "queued resource $TPU_NAME: $state"
    last=$state
    [[ $state == "$target" ]] && return
    case $target:$state in
      ACTIVE:FAILED | ACTIVE:SUSPENDING | ACTIVE:SUSPENDED | ACTIVE:NOT_FOUND)
        die "queued resource $TPU_NAME is $state; see $(shell_quote gcloud compute tpus \
          queued-resources describe "$TPU_NAME" "${LOCATION[@]}")" ;;
    esac
    ((SECONDS < deadline)) || die "gave up after ${TPU_WAIT_TIMEOUT}s waiting for $TPU_NAME to be" \
      "$target (now $state); run the same command again to keep waiting, or tpu/teardown.sh"
    sleep "$TPU_POLL_INTERVAL"
  done
}

ensure_active() {  # MODE: bring the node to ACTIVE. MODE "recreate" replaces a preempted or
  # failed one, "create" refuses to. Sets NODE_FRESH=1 when the node has nothing installed yet.
  local state
  state=$(qr_state)
  # shellcheck disable=SC2034  # read by the caller (resume.sh)
  NODE_FRESH=1
  case $state in
    ACTIVE)
      log "queued resource $TPU_NAME is ACTIVE"
      # shellcheck disable=SC2034
      NODE_FRESH=0
      return ;;
    NOT_FOUND) create_node ;;
    SUSPENDING | SUSPENDED | FAILED)
      [[ $1 == recreate ]] || die "queued resource $TPU_NAME is $state (preempted or failed):" \
        "replace it with tpu/resume.sh or delete it with tpu/teardown.sh"
      log "queued resource $TPU_NAME is $state: deleting and re-creating it"
      delete_node
      wait_for_state NOT_FOUND
      create_node ;;
    DELETING)
      log "queued resource $TPU_NAME is being deleted: waiting to create it again"
      wait_for_state NOT_FOUND
      create_node ;;
    *) log "queued resource $TPU_NAME is $state: waiting for it" ;;
  esac
  ((NO_WAIT)) || wait_for_state ACTIVE
}

# ---------------------------------------------------------------------------------------------
# Installing and launching on every worker.

check_remote_dir() {
  # Remote commands quote the directory, so a leading ~ would not expand.
  [[ $ICOT_REMOTE_DIR != '~'* ]] || die "--remote-dir is relative to home already: drop the ~"
}

install_on_workers() {  # copy or clone the project on every worker, then pip install it in a venv
  local dir py steps=("set -e")
  check_remote_dir
  dir=$(shell_quote "$ICOT_REMOTE_DIR") py=$(shell_quote "$ICOT_PYTHON")
  if [[ -n $ICOT_REPO ]]; then
    steps+=("if [ ! -d $dir/.git ]; then git clone --quiet $(shell_quote "$ICOT_REPO") $dir; fi"
      "git -C $dir fetch --quiet origin $(shell_quote "$ICOT_REF")"
      "git -C $dir checkout --quiet --detach FETCH_HEAD")
  else
    copy_source
    steps+=("mkdir -p $dir" "tar -xzf $REMOTE_TARBALL -C $dir" "rm $REMOTE_TARBALL")
  fi
  # Some images lack ensurepip: install the venv package only when creating the venv fails.
  steps+=("cd $dir"
    "if [ ! -x .venv/bin/pip ]; then $py -m venv .venv || { sudo apt-get update -q && sudo apt-get
 install -y -q $(shell_quote "${ICOT_PYTHON##*/}-venv") && $py -m venv --clear .venv; }; fi"
    ".venv/bin/pip install -q -e '.[tpu]'"
    ".venv/bin/icot --help > /dev/null")
  [[ -z $ICOT_AFTER_INSTALL ]] || steps+=("( $ICOT_AFTER_INSTALL )")
  steps+=("echo \"\$(hostname): icot installed in \$PWD\"")
  on_workers all "$(join_statements "${steps[@]}")"
}

copy_source() {  # pack the tracked and untracked-but-not-ignored files of --src, scp to all workers
  # A fixed path rather than a temporary one, so that --dry-run prints commands that work as pasted.
  local tarball=${TMPDIR:-/tmp}/icot-jax-src-$TPU_NAME.tar.gz src list
  git -C "$ICOT_SRC" rev-parse --is-inside-work-tree > /dev/null 2>&1 ||
    die "--src $ICOT_SRC is not a git checkout (pass --repo URL to clone instead)"
  src=$(shell_quote "$ICOT_SRC")
  list="git -C $src ls-files -z --cached --others --exclude-standard"
  run_line "$list | tar -C $src --null -T - -czf $(shell_quote "$tarball")"
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" "${LOCATION[@]}" --worker=all
  run rm -f "$tarball"
}

check_job_settings() {
  require ICOT_RUN_DIR "run directory"
  # Every worker writes the same checkpoints, and a re-created node must find them: only shared
  # storage works, and orbax writes gs:// paths directly.
  [[ $ICOT_RUN_DIR == gs://?* ]] || die "--run-dir must be a gs:// path, got '$ICOT_RUN_DIR'"
  local var
  for var in "${JOB_ENV[@]}"; do
    [[ $var =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$var'"
  done
  check_remote_dir
}

launch_on_workers() {  # REQUIRED_FILE ICOT_ARGS...: start `icot ICOT_ARGS...` on every worker in
  # the background and in its own process group (so --restart can stop all of it), appending to
  # REMOTE_LOG. REQUIRED_FILE (or '') must exist in the project directory.
  # Two rounds: all workers are checked (and old jobs stopped) before any starts, because a pod
  # slice where only some workers run the job hangs in its first collective.
  local required=$1 dir pid alive checks
  shift
  dir=$(shell_quote "$ICOT_REMOTE_DIR")
  pid="\"\$(cat $REMOTE_PID)\""
  alive="[ -f $REMOTE_PID ] && kill -0 $pid 2> /dev/null"
  checks=("set -e" "cd $dir"
    "[ -x .venv/bin/icot ] || { echo \"\$(hostname): no .venv/bin/icot in \$PWD: run tpu/setup.sh\" >&2; exit 1; }")
  [[ -z $required ]] || checks+=("[ -f $(shell_quote "$required") ] ||
 { echo \"\$(hostname): no $(shell_quote "$required") in \$PWD\" >&2; exit 1; }")
  if ((RESTART)); then
    checks+=("if $alive; then kill -TERM -- -$pid; for _ in \$(seq 60); do $alive || break; sleep 1; done; fi"
      "if $alive; then kill -KILL -- -$pid; fi")
  else
    checks+=("if $alive; then echo \"\$(hostname): a job is running (pid $pid): pass --restart to
 replace it\" >&2; exit 1; fi")
  fi
  on_workers all "$(join_statements "${checks[@]}")"
  on_workers all "$(start_job_command "$@")"
}

start_job_command() {  # ICOT_ARGS...: the remote command that starts the job, detached from ssh
  local cmd
  cmd=$(shell_quote env PYTHONUNBUFFERED=1 "${JOB_ENV[@]}" .venv/bin/icot "$@")
  join_statements "set -e" "cd $(shell_quote "$ICOT_REMOTE_DIR")" "mkdir -p logs" \
    "echo \"=== \$(date -u +%FT%TZ) \$(hostname):\" $(shell_quote "$(shell_quote icot "$@")") >> $REMOTE_LOG" \
    "nohup setsid $cmd >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID" \
    "echo \"\$(hostname): started pid \$(cat $REMOTE_PID), log \$PWD/$REMOTE_LOG\""
}
