#!/usr/bin/env bash
# secrets-backup.sh: encrypt the application .env off-site (opsdrill secrets backup), daily.
# Extra arguments go to `opsdrill secrets backup`; environment and exit codes: see run-locked.sh.
exec "$(dirname "$0")/run-locked.sh" "secrets backup" "$@"
