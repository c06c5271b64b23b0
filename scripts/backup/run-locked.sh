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
# Exit status is opsdrill's, the same for every subcommand (opsdrill --help):
#   0    success.
#   1    the operation ran and failed because of the data or the target: a stage failed
#        (pg_dump, the compressor, gpg, a full disk), a backup object or manifest is corrupt,
#        truncated or unreadable, a restore or drill does not match its manifest, or a
#        backup is encrypted to recipients the drill key is not one of.
#   2    opsdrill could not do its job: the configuration (inventory, command line) is
#        wrong, a target is unreachable or timed out (also mid-transfer), opsdrill's own
#        credentials were rejected (database password, S3 key pair, drill key passphrase), a
#        required tool is missing, a safety guard refused, the operator did not confirm, or
#        an unexpected internal error.
#   75   skipped: another run holds the lock (a backup's per-database lock on the live server,
#        which holds across hosts, or a cron wrapper's local lock per command); nothing was
#        done, and the message names the holder.
#   130  interrupted (SIGINT, Ctrl-C); 143 for SIGTERM and 129 for SIGHUP (128 + the
#        signal). The run first removes what it started (its temporary files, its
#        gpg-agent, the drill's scratch database); what a run killed outright (SIGKILL)
#        left, the next run of the same operation removes and reports.
# The error message names what to fix (the inventory key, the environment variable). A
# mirror that could not copy some files exits 1 if any file was at fault, otherwise 2.
# The wrapper's own setup problems (no COMMAND, OPSDRILL_INVENTORY unset, OPSDRILL_BIN not
# found) are configuration: 2. Runbook: docs/runbooks/backup-and-restore.md
set -euo pipefail

if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "usage: run-locked.sh COMMAND [ARGS...]" >&2
  exit 2
fi
command=$1  # may be two words: "secrets backup"
shift
read -r -a words <<< "$command"
name=${command// /-}
bin=${OPSDRILL_BIN:-opsdrill}
lock_dir=${OPSDRILL_LOCK_DIR:-/run/lock}
lock=$lock_dir/opsdrill-$name.lock

log() { printf '%s opsdrill-%s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$name" "$*" >&2; }

if [ -z "${OPSDRILL_INVENTORY:-}" ]; then
  log "FAILED (exit 2): OPSDRILL_INVENTORY is not set (fix: export OPSDRILL_INVENTORY=/etc/opsdrill/prod.toml)"
  exit 2
fi
inventory=$OPSDRILL_INVENTORY
if ! command -v "$bin" >/dev/null 2>&1; then
  log "FAILED (exit 2): $bin not found (fix: set OPSDRILL_BIN to the opsdrill executable)"
  exit 2
fi

# Two locks, one exit code. This flock is per command and per host: it keeps a run that
# outlasts its cron slot from piling up behind itself. `opsdrill backup` also locks each
# database itself, on the live server (a PostgreSQL advisory lock): that one holds across
# hosts and for runs started by hand, and a run that finds it taken exits 75 as well,
# naming the holder. Keep both: the flock skips before opsdrill even starts; the
# advisory lock is the one that protects the database and the store. A run killed
# outright holds neither: the kernel drops the flock, PostgreSQL the advisory lock.
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
elif [ "$rc" -eq 75 ]; then
  log "SKIPPED after ${elapsed}s: another run holds the lock (see the line above): $what"
else
  log "FAILED (exit $rc) after ${elapsed}s: $what; see the error above and the runbook"
fi
exit "$rc"
