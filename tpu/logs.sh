#!/usr/bin/env bash
# Follow the job's log on one worker or on all of them.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $PROG [options]

Follow $REMOTE_LOG (the log tpu/launch.sh and tpu/resume.sh append to) on worker 0, or on
several workers with each line prefixed by the worker's hostname. Ctrl-C stops following.

Examples:
  $PROG --name icot-v4 --zone us-central2-b --project my-project
  $PROG --name icot-v4 --zone us-central2-b --project my-project --worker all --lines 20 --no-follow

USAGE
  print_flags
}

WORKER=0
SHOW_LINES=100
NO_FOLLOW=0
flag --worker WORKER value "worker index, list (1,3), range (0-3) or all" WORKER
flag --lines SHOW_LINES value "lines of history to show first" N
flag --no-follow NO_FOLLOW switch "print the last --lines lines and exit"
remote_dir_flag
parse_args "$@"
no_positional
check_location
check_remote_dir
[[ $SHOW_LINES =~ ^[0-9]+$ ]] || die "--lines must be a whole number, got '$SHOW_LINES'"
[[ $WORKER =~ ^(all|[0-9]+([,-][0-9]+)*)$ ]] || die "--worker must be N, a list, a range or all, got '$WORKER'"

tail=(tail -n "$SHOW_LINES")
((NO_FOLLOW)) || tail+=(-F)
show="$(shell_quote "${tail[@]}") $REMOTE_LOG"
# Lines from several workers interleave: tag each with its worker's hostname (TPU VMs end in -w-N).
[[ $WORKER =~ ^[0-9]+$ ]] || show+=" | sed -u \"s/^/[\$(hostname)] /\""
on_workers "$WORKER" "cd $(shell_quote "$ICOT_REMOTE_DIR") && $show"
