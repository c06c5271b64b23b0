"""``python -m opsdrill_pytest.report generate|serve``: find the Allure CLI, then hand over
to report.sh (two reports, the history file, categories, the swap).

Paths (ALLURE_RESULTS, ALLURE_REPORT, ALLURE_REPORT_SINGLE, ALLURE_HISTORY, REPORT_PORT)
come from the environment, relative to the current directory, so the same command works in
a checkout (``make report``) and in a CI job that only pip-installed opsdrill.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from opsdrill_pytest.report import ACTIONS, ALLURE_VERSION, HERE, SCRIPT

CLI = Path("node_modules") / "allure" / "cli.js"
INSTALL = f"npm install allure@{ALLURE_VERSION}"


def find_allure_cli(cwd: Path) -> Path | None:
    """ALLURE_CLI if set, else the directory's node_modules, else a checkout's: the last is
    how `make report` runs (npm ci at the repository root) without anything exported."""
    explicit = os.environ.get("ALLURE_CLI")
    if explicit:
        return Path(explicit)
    if (cwd / CLI).is_file():
        return (cwd / CLI).resolve()
    checkout = HERE.parents[1]  # opsdrill_pytest/report -> the repository root
    if (checkout / "package.json").is_file() and (checkout / CLI).is_file():
        return checkout / CLI
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ACTIONS:
        print("report: usage: python -m opsdrill_pytest.report generate|serve", file=sys.stderr)
        return 2
    action = argv[0]
    cli = find_allure_cli(Path.cwd())
    report = Path(os.environ.get("ALLURE_REPORT") or "reports/allure-report")
    needs_allure = action == "generate" or not (report / "index.html").is_file()
    if needs_allure and (cli is None or not cli.is_file()):
        where = f"ALLURE_CLI={cli} does not exist" if cli else "Allure is not installed"
        print(
            f"report: {where}: run `{INSTALL}` in this directory "
            f"(or set ALLURE_CLI to its node_modules/allure/cli.js)",
            file=sys.stderr,
        )
        return 2
    bash = shutil.which("bash")
    if bash is None:
        print("report: bash is not installed", file=sys.stderr)
        return 2
    env = dict(os.environ, ALLURE_CLI=str(cli or ""))
    env.setdefault("PYTHON", sys.executable)  # serve's http.server
    sys.stdout.flush()
    # exec: the report's exit status and signals (Ctrl-C on serve) are the command's own.
    os.execve(bash, [bash, str(SCRIPT), action], env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
