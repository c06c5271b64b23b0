#!/usr/bin/env bash
# The Allure 3 report of a check run. Run it through `python -m opsdrill_pytest.report
# generate|serve` (`make report`, `make report-serve`, the CI templates), which finds the
# Allure CLI and passes it in ALLURE_CLI:
#
#   generate   results -> normal report + single-file report, history += 1 run
#   serve      serve the normal report on 127.0.0.1 (generates it if missing)
#
# Paths (relative to the current directory, or absolute) come from the environment:
#   ALLURE_RESULTS        reports/allure-results          (input: pytest --alluredir)
#   ALLURE_REPORT         reports/allure-report           (normal report, needs HTTP)
#   ALLURE_REPORT_SINGLE  reports/allure-report-single    (index.html, opens from file://)
#   ALLURE_HISTORY        reports/history.jsonl           (carried from run to run)
#   REPORT_PORT           8000 for `serve` (0: any free port)
# Allure itself is the pinned npm package (allure@3.18.0); it runs offline once installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

results="${ALLURE_RESULTS:-reports/allure-results}"
report="${ALLURE_REPORT:-reports/allure-report}"
single="${ALLURE_REPORT_SINGLE:-reports/allure-report-single}"
history="${ALLURE_HISTORY:-reports/history.jsonl}"
allure_cli="${ALLURE_CLI:-}"

die() {
  echo "report: $*" >&2
  exit 2
}

generate() {
  [ -n "$allure_cli" ] && [ -f "$allure_cli" ] ||
    die "Allure is not installed (run: npm install allure@3.18.0, or set ALLURE_CLI)"
  command -v node >/dev/null || die "node is not installed (apt-get install nodejs npm)"
  if ! compgen -G "$results/*-result.json" >/dev/null; then
    die "no test results in $results (run the checks with --alluredir $results)"
  fi
  mkdir -p "$(dirname "$report")" "$(dirname "$history")"
  # Build next to the final report, then swap: a failed generation keeps the previous report.
  build="$(mktemp -d "$(dirname "$report")/.allure-build.XXXXXX")"
  trap 'rm -rf "$build"' EXIT
  categories=""
  [ -f "$results/categories.json" ] && categories="$results/categories.json"
  OPSDRILL_REPORT_BUILD="$build" OPSDRILL_HISTORY="$history" OPSDRILL_CATEGORIES="$categories" \
    node "$allure_cli" generate --config "$here/allurerc.mjs" --output "$build" "$results"
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
  echo "report: $report/index.html (serve: python -m opsdrill_pytest.report serve)"
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
  *) die "usage: python -m opsdrill_pytest.report generate|serve" ;;
esac
