#!/usr/bin/env bash
# Request a TPU VM or pod slice as a queued resource and wait until it is ACTIVE.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $PROG [options]

Request a TPU VM or pod slice as a queued resource with one node of the same name, and wait
(bounded by --timeout) until it is ACTIVE. Running it again while the request is queued keeps
waiting; a node that is already ACTIVE is left alone; a preempted one is left to tpu/resume.sh.

Example:
  $PROG --name icot-v4 --zone us-central2-b --project my-project --type v4-16 --provisioning spot

USAGE
  print_flags
}

node_flags
flag --no-wait NO_WAIT switch "return once the request is queued instead of waiting for ACTIVE"
parse_args "$@"
no_positional
check_location
check_node_settings
ensure_active create
