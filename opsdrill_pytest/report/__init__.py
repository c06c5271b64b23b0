"""The Allure 3 report of a check run, shipped with the plugin so an installed opsdrill can
build it anywhere: ``python -m opsdrill_pytest.report generate|serve`` (see ``__main__``).

Allure itself is an npm package, not a Python one: the wheel carries the script and the
Allure configuration; the CLI comes from the directory's ``node_modules`` (``npm install
allure@ALLURE_VERSION``), from ``ALLURE_CLI``, or from a checkout's ``node_modules``.
"""

from __future__ import annotations

from pathlib import Path

# The Allure 3 the report is built and tested with (package.json pins the same version).
ALLURE_VERSION = "3.18.0"
HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "report.sh"
CONFIG = HERE / "allurerc.mjs"
ACTIONS = ("generate", "serve")
