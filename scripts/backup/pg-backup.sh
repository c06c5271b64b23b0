#!/usr/bin/env bash
# pg-backup.sh: take an off-site backup (opsdrill backup), hourly.
# Extra arguments go to `opsdrill backup`; environment and exit codes: see run-locked.sh.
exec "$(dirname "$0")/run-locked.sh" backup "$@"
