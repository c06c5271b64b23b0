#!/usr/bin/env bash
# prune.sh: apply the retention policy (opsdrill prune), daily; add --dry-run to only print the plan.
# Extra arguments go to `opsdrill prune`; environment and exit codes: see run-locked.sh.
exec "$(dirname "$0")/run-locked.sh" prune "$@"
