#!/usr/bin/env bash
# Delete the queued resource and its TPU node.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $PROG [options]

Delete the queued resource --name and its node (the VMs, their disks and any job on them).
The run directory on gs:// is not touched. Asks for confirmation on a terminal; anywhere else
(scripts, CI) it refuses unless --yes.

Example:
  $PROG --name icot-v4 --zone us-central2-b --project my-project --yes

USAGE
  print_flags
}

confirm() {  # QUESTION: ask on the terminal; without one, only --yes confirms
  local answer
  ((ASSUME_YES || DRY_RUN)) && return
  [[ -t 0 ]] || die "refusing to $1 without confirmation: stdin is not a terminal; pass --yes"
  read -r -p "$PROG: $1? [y/N] " answer
  [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || die "aborted: nothing deleted"
}

ASSUME_YES=0
flag --yes ASSUME_YES switch "delete without asking"
parse_args "$@"
no_positional
check_location
confirm "delete queued resource $TPU_NAME and its TPU node in $TPU_ZONE (project $TPU_PROJECT)"
delete_node
