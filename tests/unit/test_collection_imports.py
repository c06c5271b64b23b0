"""A check run loads the clients of the areas its inventory has, and no others.

pytest imports every check module to collect it, whatever ``-m`` selects: a module that
imported the S3 SDK, psycopg or redis-py at its top made a DNS-only run pay for all three
(~0.2 s of a 1.8 s run of 100 domains, issue 16). These run a real collection in a child
process, as a user's run starts, and list what it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ("minio", "psycopg", "redis")

# Reports, at the end of the session, which client packages the process has loaded.
REPORTER = """
import json, sys

def pytest_sessionfinish(session):
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(CLIENTS))
    print("\\nLOADED=" + json.dumps(loaded))  # own line: -q's progress dots end without one
"""

DNS_ONLY = """
name = "dns-only"

[dns]
nameservers = ["127.0.0.1"]
port = 5399
timeout_seconds = 1.0

[mail_providers.relay]
spf = ["ip4:192.0.2.1"]
dkim_selectors = ["s1"]

[sending_domains."example.test"]
providers = ["relay"]
receives_mail = false
"""


def _loaded_by(tmp_path: Path, *args: str) -> list[str]:
    (tmp_path / "loaded_reporter.py").write_text(f"CLIENTS = {CLIENTS!r}\n{REPORTER}")
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(DNS_ONLY)
    out = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "opsdrill_checks", "--inventory", str(inventory)),
            *("-p", "loaded_reporter", "-p", "no:cacheprovider", "-q", "-s", *args),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("LOADED=")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-2000:]
    loaded: list[str] = json.loads(line.removeprefix("LOADED="))
    return loaded


def test_collecting_every_check_for_a_dns_only_inventory_loads_no_other_client(
    tmp_path: Path,
) -> None:
    assert _loaded_by(tmp_path, "--collect-only") == []


def test_a_dns_only_run_skips_the_other_areas_without_loading_their_clients(
    tmp_path: Path,
) -> None:
    """The whole run, not the DNS checks alone: every other area's checks are collected
    and skipped as not configured, and still nothing of theirs is loaded."""
    assert _loaded_by(tmp_path, "-m", "not dns") == []
