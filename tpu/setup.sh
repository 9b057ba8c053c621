#!/usr/bin/env bash
# Install the project on every worker of a TPU VM or pod slice.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $PROG [options]

Install icot-jax on every worker: copy the local checkout (tracked and untracked files that git
does not ignore) or clone --repo at --ref, then create a venv and pip install -e '.[tpu]'.
Running it again updates the code and the install in place.

Examples:
  $PROG --name icot-v4 --zone us-central2-b --project my-project
  $PROG --name icot-v4 --zone us-central2-b --project my-project \\
      --repo https://github.com/me/icot-jax.git --ref v0.1.0

USAGE
  print_flags
}

install_flags
parse_args "$@"
no_positional
check_location
install_on_workers
