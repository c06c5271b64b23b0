#!/usr/bin/env bash
# restore.sh: opsdrill restore, e.g. the weekly `--drill -d crm` from cron.
# Extra arguments go to `opsdrill restore`; environment and exit codes: see run-locked.sh.
exec "$(dirname "$0")/run-locked.sh" restore "$@"
