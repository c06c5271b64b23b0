#!/usr/bin/env bash
# The Allure 3 report of a `make verify` run (used by `make report` and `make report-serve`).
#
#   scripts/report.sh generate   results -> normal report + single-file report, history += 1 run
#   scripts/report.sh serve      serve the normal report on 127.0.0.1 (generates it if missing)
#
# Paths (relative to the repository root, or absolute) come from the environment, with the
# Makefile's defaults:
#   ALLURE_RESULTS        reports/allure-results          (input, written by `make verify`)
#   ALLURE_REPORT         reports/allure-report           (normal report, needs HTTP)
#   ALLURE_REPORT_SINGLE  reports/allure-report-single    (index.html, opens from file://)
#   ALLURE_HISTORY        reports/history.jsonl           (carried from run to run)
#   REPORT_PORT           8000 for `serve` (0: any free port)
# Allure itself is the pinned npm package in node_modules/ (`make report-deps`); it runs
# offline once installed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

results="${ALLURE_RESULTS:-reports/allure-results}"
report="${ALLURE_REPORT:-reports/allure-report}"
single="${ALLURE_REPORT_SINGLE:-reports/allure-report-single}"
history="${ALLURE_HISTORY:-reports/history.jsonl}"
allure_cli="$root/node_modules/allure/cli.js"

die() {
  echo "report: $*" >&2
  exit 2
}

generate() {
  [ -f "$allure_cli" ] || die "Allure is not installed in node_modules/ (run: make report-deps)"
  command -v node >/dev/null || die "node is not installed (run: make system)"
  if ! compgen -G "$results/*-result.json" >/dev/null; then
    die "no test results in $results (run: make verify)"
  fi
  mkdir -p "$(dirname "$report")" "$(dirname "$history")"
  # Build next to the final report, then swap: a failed generation keeps the previous report.
  build="$(mktemp -d "$(dirname "$report")/.allure-build.XXXXXX")"
  trap 'rm -rf "$build"' EXIT
  categories=""
  [ -f "$results/categories.json" ] && categories="$results/categories.json"
  OPSDRILL_REPORT_BUILD="$build" OPSDRILL_HISTORY="$history" OPSDRILL_CATEGORIES="$categories" \
    node "$allure_cli" generate --config "$root/allurerc.mjs" --output "$build" "$results"
  if [ ! -f "$build/awesome/index.html" ] || [ ! -f "$build/single/index.html" ]; then
    die "Allure produced no report in $build"
  fi
  # The Awesome template loads Google Analytics; an audit report should make no third-party
  # requests (and CI artifacts are often opened offline), so drop that block.
  node - "$build/awesome/index.html" "$build/single/index.html" <<'JS'
const fs = require("node:fs");
const gtag = /\s*<script async src="https:\/\/www\.googletagmanager\.com\/[^"]*"><\/script>\s*<script>\s*window\.dataLayer[\s\S]*?<\/script>/;
for (const file of process.argv.slice(2)) {
  fs.writeFileSync(file, fs.readFileSync(file, "utf8").replace(gtag, ""));
}
JS
  rm -rf "$report" "$single"
  mv "$build/awesome" "$report"
  mkdir -p "$single"
  mv "$build/single/index.html" "$single/index.html"
  rm -rf "$build"
  trap - EXIT
  runs=0
  [ -f "$history" ] && runs="$(wc -l <"$history")"
  echo "report: $report/index.html (serve: make report-serve)"
  echo "report: $single/index.html (single file)"
  echo "report: history $history ($((runs)) runs)"
}

serve() {
  [ -f "$report/index.html" ] || generate
  port="${REPORT_PORT:-8000}"
  # http.server prints the port it bound (useful with REPORT_PORT=0); -u: print it now.
  echo "report: serving $report on 127.0.0.1 (Ctrl-C to stop)"
  exec "${PYTHON:-python3}" -u -m http.server --bind 127.0.0.1 --directory "$report" "$port"
}

case "${1:-}" in
  generate) generate ;;
  serve) serve ;;
  *) die "usage: $0 generate|serve" ;;
esac
