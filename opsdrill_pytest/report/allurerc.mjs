// Allure 3 configuration for `python -m opsdrill_pytest.report generate` (report.sh beside
// this file sets the OPSDRILL_* variables).
//
// - Two Awesome reports from one generation: a normal multi-file one (served over HTTP) and
//   a single-file one (opens from file://, archived as a CI artifact). One generation, so
//   the history file gets exactly one entry per run.
// - History (trend graphs, each check's previous statuses and durations) lives in a JSON
//   Lines file that is carried from run to run (kept locally under reports/, cached in CI).
// - Categories: Allure 3's Awesome report ignores categories.json in the results directory
//   (it only keeps it as Allure 2 metadata), so the same file is read here. The file the
//   pytest controller copied into the results wins; the plugin's own categories.json (next
//   to this package, installed or not) is the fallback.
//   environment.properties is read from the results directory by Allure itself.
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const env = process.env;
const reportName = env.OPSDRILL_REPORT_NAME || "opsdrill verification";
const shipped = fileURLToPath(new URL("../categories.json", import.meta.url));
const categoriesFile = [env.OPSDRILL_CATEGORIES, shipped].find(
  (path) => path && existsSync(path),
);
const categories = categoriesFile ? JSON.parse(readFileSync(categoriesFile, "utf8")) : [];
const awesome = {
  reportName,
  reportLanguage: "en",
  // Tree by what was verified: epic (backups, storage, dns, mail), then feature.
  groupBy: ["epic", "feature"],
};

export default {
  name: reportName,
  output: env.OPSDRILL_REPORT_BUILD || "reports/.allure-build",
  historyPath: env.OPSDRILL_HISTORY || "reports/history.jsonl",
  // A week of hourly runs (~50 kB each with today's checks); older runs are dropped.
  historyLimit: Number(env.OPSDRILL_HISTORY_LIMIT || 168),
  categories,
  plugins: {
    awesome: { options: awesome },
    single: {
      import: "@allurereport/plugin-awesome",
      options: { ...awesome, singleFile: true },
    },
  },
};
