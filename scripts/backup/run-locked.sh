#!/usr/bin/env bash
# run-locked.sh 'COMMAND [SUBCOMMAND]' [ARGS...]: the shared body of the cron wrappers beside it.
# Runs `opsdrill COMMAND --inventory $OPSDRILL_INVENTORY ARGS...` under a lock so that
# overlapping cron runs do not pile up, and logs one timestamped result line to stderr.
#
#   OPSDRILL_INVENTORY  inventory TOML (required)
#   OPSDRILL_BIN        opsdrill executable (default: opsdrill on PATH)
#   OPSDRILL_LOCK_DIR   where the lock file lives (default: /run/lock)
#   OPSDRILL_METRICS_DIR  if set, also write DIR/opsdrill-COMMAND.prom (Prometheus text for
#                       node_exporter's textfile collector: success, last success, bytes)
#
# Exit status is opsdrill's (0 ok, 1 failed, 2 config/unreachable/refused), or 75 when a
# previous run still holds the lock. Runbook: docs/runbooks/backup-and-restore.md
set -euo pipefail

command=${1:?usage: run-locked.sh COMMAND [ARGS...]}  # may be two words: "secrets backup"
shift
read -r -a words <<< "$command"
name=${command// /-}
inventory=${OPSDRILL_INVENTORY:?set OPSDRILL_INVENTORY}
bin=${OPSDRILL_BIN:-opsdrill}
lock_dir=${OPSDRILL_LOCK_DIR:-/run/lock}
lock=$lock_dir/opsdrill-$name.lock

log() { printf '%s opsdrill-%s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$name" "$*" >&2; }

mkdir -p "$lock_dir"
exec 9>>"$lock"
if ! flock -n 9; then
  log "SKIPPED: a previous run still holds $lock"
  exit 75
fi

extra=()
if [ -n "${OPSDRILL_METRICS_DIR:-}" ]; then
  extra=(--metrics-file "$OPSDRILL_METRICS_DIR/opsdrill-$name.prom")
fi
what="$name --inventory $inventory${*:+ $*}"
started=$(date +%s)
# fd 9 (the lock) is not handed to opsdrill, so no helper process it starts can keep it.
if "$bin" "${words[@]}" --inventory "$inventory" "${extra[@]}" "$@" 9>&-; then rc=0; else rc=$?; fi
elapsed=$(($(date +%s) - started))

if [ "$rc" -eq 0 ]; then
  log "ok in ${elapsed}s: $what"
else
  log "FAILED (exit $rc) after ${elapsed}s: $what; see the error above and the runbook"
fi
exit "$rc"
