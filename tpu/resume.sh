#!/usr/bin/env bash
# Bring a run back after a preemption: re-create the node if needed, reinstall, `icot train --resume`.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $PROG [options]

Continue the run in --run-dir from its latest checkpoint, whatever happened to the node:
  ACTIVE                      relaunch (reinstall first only with --setup)
  SUSPENDED, FAILED, gone     delete what is left, create the node again, wait, install, relaunch
  queued or provisioning      wait until ACTIVE, install, relaunch
The job runs \`icot train --resume RUN_DIR\` on every worker, like tpu/launch.sh. It refuses to
start while a job is still running on the node, unless --restart.

Example (a cron job or a loop can run it unattended):
  $PROG --name icot-v4 --zone us-central2-b --project my-project --type v4-16 \\
      --run-dir gs://my-bucket/icot/gsm8k-small

USAGE
  print_flags
}

FORCE_SETUP=0
node_flags
install_flags
job_flags
flag --setup FORCE_SETUP switch "reinstall the project even when the node survived"
parse_args "$@"
no_positional
check_location
check_node_settings
check_job_settings
ensure_active recreate
if ((NODE_FRESH || FORCE_SETUP)); then
  install_on_workers
fi
launch_on_workers '' train --resume "$ICOT_RUN_DIR"
