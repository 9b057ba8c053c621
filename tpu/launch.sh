#!/usr/bin/env bash
# Start `icot train CONFIG [key=value ...]` on every worker in the background.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $PROG [options] CONFIG [key=value ...]

Start \`icot train CONFIG key=value ... run_dir=RUN_DIR\` on every worker at once (a pod slice runs
one process per worker; JAX finds the others by itself), detached from the ssh session and
appending to $REMOTE_LOG in the project directory of each worker (follow it with tpu/logs.sh).
CONFIG is a path inside the project, e.g. configs/paper/gsm8k_gpt2_small_icot.yaml.

Example:
  $PROG --name icot-v4 --zone us-central2-b --project my-project \\
      --run-dir gs://my-bucket/icot/gsm8k-small configs/paper/gsm8k_gpt2_small_icot.yaml seed=1

USAGE
  print_flags
}

job_flags
parse_args "$@"
((${#ARGS[@]})) || die "missing CONFIG (see $PROG --help)"
for override in "${ARGS[@]:1}"; do
  [[ $override == *=* ]] || die "overrides are key=value, got '$override'"
  [[ $override != run_dir=* ]] || die "pass the run directory with --run-dir, not $override"
done
check_location
check_job_settings
launch_on_workers "${ARGS[0]}" train "${ARGS[@]}" "run_dir=$ICOT_RUN_DIR"
