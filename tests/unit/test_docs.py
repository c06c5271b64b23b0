"""Docs checks: what the documentation says is what the tool does, tested by running it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from opsdrill.config.envfile import read_env_file
from opsdrill.mail.appenv import forbidden_keys_set
from tests.conftest import ROOT

EXAMPLE = ROOT / "docs" / "inventory.example.toml"
MAIL_RUNBOOK = ROOT / "docs" / "runbooks" / "email-deliverability.md"


def _clean_env() -> dict[str, str]:
    """No opsdrill variable, no secret: what a new operator's shell has."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}


def test_example_inventory_header_says_what_inventory_check_lists() -> None:
    header = EXAMPLE.read_text().split("\n\n", 1)[0]  # the comment block before the first key
    listed = set(re.findall(r"^#\s+(OPSDRILL_[A-Z0-9_]+)\s", header, re.M))
    said = re.search(
        r"lists all (\d+) variables as not set, in (\d+) lines.*?then the\s*#?\s*(\d+) key "
        r"files as not found",
        header,
        re.S,
    )
    assert said, header
    n_vars, n_lines, n_files = (int(g) for g in said.groups())

    proc = subprocess.run(
        [sys.executable, "-m", "opsdrill", "inventory", "check", str(EXAMPLE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    missing = re.findall(r"environment variable (\S+) is not set", proc.stderr)
    files = re.findall(r": file (\S+) not found", proc.stderr)
    assert set(missing) == listed, (sorted(set(missing) ^ listed), proc.stderr)
    assert (len(set(missing)), len(missing), len(files)) == (n_vars, n_lines, n_files)
    assert len(listed) == n_vars
    assert len(proc.stderr.strip().splitlines()) == n_lines + n_files  # nothing else


# Every form in which dotenv (and so mail.config.redirect) sees EMAIL_REDIRECT_TO set.
REDIRECT_FORMS = [
    "EMAIL_REDIRECT_TO=plain@example.test",
    "export EMAIL_REDIRECT_TO=export@example.test",
    "export\tEMAIL_REDIRECT_TO=tab@example.test",
    "export   EMAIL_REDIRECT_TO=spaces@example.test",
    "EMAIL_REDIRECT_TO = spaced@example.test",
    "EMAIL_REDIRECT_TO\t=\ttabbed@example.test",
    "  EMAIL_REDIRECT_TO=indented@example.test",
    "'EMAIL_REDIRECT_TO'=quoted-key@example.test",
    'EMAIL_REDIRECT_TO="quoted@example.test"',
]
KEPT = "A=1\nEMAIL_REDIRECT_TO_BACKUP=other@example.test\n# EMAIL_REDIRECT_TO=comment\nB=2\n"


def _redirect_commands(path: Path) -> tuple[str, str]:
    """The runbook's grep and sed for the redirect, pointed at ``path``."""
    text = MAIL_RUNBOOK.read_text()
    section = text.split('<a id="redirect"></a>', 1)[1].split("<a id=", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    lines = [line.strip() for line in block.splitlines()]
    grep = next(line for line in lines if line.startswith("grep "))
    sed = next(line for line in lines if line.startswith("sed "))
    target = shlex.quote(str(path))
    return grep.replace("/srv/crm/.env", target), sed.replace("/srv/crm/.env", target)


def test_the_runbook_redirect_fix_finds_and_removes_every_form_the_check_flags(
    tmp_path: Path,
) -> None:
    env = tmp_path / "app.env"
    grep, sed = _redirect_commands(env)
    for form in REDIRECT_FORMS:
        env.write_text(f"A=1\n{form}\n" + KEPT.split("\n", 1)[1])
        assert forbidden_keys_set(read_env_file(env), ["EMAIL_REDIRECT_TO"]), form  # flagged
        found = subprocess.run(["bash", "-c", grep], capture_output=True, text=True)
        assert found.stdout.startswith(f"2:{form}"), (form, grep, found.stdout)
        subprocess.run(["bash", "-c", sed], check=True)
        after = read_env_file(env)
        assert forbidden_keys_set(after, ["EMAIL_REDIRECT_TO"]) == {}, (form, sed)
        assert env.read_text() == KEPT, (form, env.read_text())
