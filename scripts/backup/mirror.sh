#!/usr/bin/env bash
# mirror.sh: copy new and changed files off-site (opsdrill mirror), hourly. Never deletes.
# Extra arguments go to `opsdrill mirror`; environment and exit codes: see run-locked.sh.
exec "$(dirname "$0")/run-locked.sh" mirror "$@"
