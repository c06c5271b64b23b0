"""The CI templates in ci-templates/: valid for GitHub Actions and GitLab CI (their official
JSON schemas, vendored by check-jsonschema), and doing what the schedules promise: hourly
checks, a weekly drill, a manual migration run, each building and publishing the Allure
report with its history, secrets only from the CI's secret store. They use opsdrill in its
installed form (pip, no checkout, no make): the jobs' scripts run here with apt-get, npm and
the venv's python stubbed, and every command they run is checked to exist."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsdrill_pytest import report as report_module
from opsdrill_pytest.report import __main__ as report_main

ROOT = Path(__file__).resolve().parents[2]
GITHUB = ROOT / "ci-templates" / "github-actions"
GITLAB = ROOT / "ci-templates" / "gitlab-ci" / ".gitlab-ci.yml"
GITHUB_FILES = sorted(GITHUB.glob("*.yml"))
RUN_WORKFLOW = "opsdrill-run.yml"
PUBLISHED = {"reports/allure-results", "reports/allure-report-single/index.html"}
HISTORY = "reports/history.jsonl"
HOURLY = "not drill and not migration"
SECRETISH = re.compile(r"PASSWORD|PASSPHRASE|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|INVENTORY")
# What the checks run (pg_dump, pg_restore and psql; gpg and gpgconf; the decompressors),
# the venv, pip's git+https requirements, and Node.js for Allure. Not the local stack.
DEBIAN = {
    "python3",
    "python3-venv",
    "git",
    "ca-certificates",
    "postgresql-client",
    "gnupg",
    "zstd",
    "gzip",
    "nodejs",
    "npm",
}
PACKAGE = "opsdrill==0.1.0"
RESULTS = "reports/allure-results"


def _checks_argv(inventory: str, runbook_base_url: str = "") -> list[str]:
    """The check run both templates make, as the venv's python receives it."""
    return [
        *("-m", "pytest", "--pyargs", "opsdrill_checks", "-p", "no:cacheprovider"),
        *("--inventory", inventory, "--runbook-base-url", runbook_base_url),
        *("-n", "2", "--dist", "loadgroup", "--alluredir", RESULTS, "--clean-alluredir"),
    ]


REPORT_ARGV = ["-m", "opsdrill_pytest.report", "generate"]


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def _on(workflow: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the key `on` as True.
    triggers = workflow.get("on", workflow.get(True))
    assert isinstance(triggers, dict), workflow
    return triggers


def _python_commands(script: str) -> list[list[str]]:
    """Each `python -m MODULE ARGS` a script runs (any python: python3, a venv's by path),
    as its words from `-m` on, unexpanded."""
    script = script.replace("\\\n", " ")
    command_start = r"(?:^|&&|\|\||;|\{)\s*"
    assignments = r"""(?:[A-Z_]+=(?:"(?:[^"\\]|\\.)*"|\S+)\s+)*"""
    python = r"""(?:"[^"\s]*/bin/python"|python3?)\s+"""
    found = re.findall(command_start + assignments + python + r"(-m\s+[^|;&\n>]*)", script, re.M)
    return [shlex.split(command) for command in found]


def _runs_make(script: str) -> bool:
    return bool(re.search(r"(?:^|&&|\|\||;|\{)\s*(?:[A-Z_]+=\S+\s+)*make\b", script, re.M))


def _npm_allure_versions(script: str) -> set[str]:
    return set(re.findall(r"^\s*npm install\b[^\n]*\sallure@(\S+)", script, re.M))


def _apt_packages(script: str) -> set[str]:
    script = re.sub(r"\\\n|\n(?=\s)", " ", script)
    out: set[str] = set()
    for line in re.findall(r"apt-get install ([^\n>]*)", script):
        out.update(w for w in line.split() if not w.startswith("-"))
    return out


def _inventory_secret_names() -> set[str]:
    example = tomllib.loads((ROOT / "docs" / "inventory.example.toml").read_text())
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str):
                    names.add(value)
                walk(value)

    walk(example)
    return names


CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def cron_fields(expr: str) -> list[set[int]]:
    """The values each of the five fields matches; AssertionError for an invalid one."""
    fields = expr.split()
    assert len(fields) == 5, f"{expr!r}: 5 fields expected"
    out = []
    for field, (lo, hi) in zip(fields, CRON_RANGES, strict=True):
        values: set[int] = set()
        for part in field.split(","):
            found = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", part)
            assert found, f"{expr!r}: bad field {field!r}"
            rng, step = found.group(1), int(found.group(2) or 1)
            if rng == "*":
                first, last = lo, hi
            else:
                first, _, end = rng.partition("-")
                first_n = int(first)
                last_n = int(end) if end else (hi if found.group(2) else first_n)
                first, last = first_n, last_n
            assert lo <= first <= last <= hi and step >= 1, f"{expr!r}: {part!r} out of range"
            values |= set(range(first, last + 1, step))
        out.append(values)
    return out


def _kind(expr: str) -> str:
    minute, hour, dom, month, dow = cron_fields(expr)
    every = [set(range(lo, hi + 1)) for lo, hi in CRON_RANGES]
    daily = (hour, dom, month) == (every[1], every[2], every[3])
    if len(minute) == 1 and daily and dow >= set(range(7)):
        return "hourly"
    if len(minute) == len(hour) == len(dow) == 1 and (dom, month) == (every[2], every[3]):
        return "weekly"
    return "other"


def test_cron_validator() -> None:
    assert _kind("17 * * * *") == "hourly"
    assert _kind("40 3 * * 0") == "weekly"
    assert _kind("*/15 * * * *") == "other"
    for bad in ("60 * * * *", "* * * *", "5 24 * * *", "0 0 * * MON", "1-0 * * * *"):
        with pytest.raises(AssertionError):
            cron_fields(bad)


# The jobs' commands, stubbed ------------------------------------------------------------


class _Stubs:
    """apt-get, npm and python3 on PATH; `python3 -m venv DIR` makes DIR/bin/python a stub
    too. Each records its argv in calls.log (tab-separated; the venv's python by its path);
    the check run also records PYTEST_ADDOPTS and lists the inventory's directory."""

    def __init__(self, tmp_path: Path, verify_rc: int = 0, report_rc: int = 0) -> None:
        self.dir = tmp_path / "stubs"
        self.bin = self.dir / "bin"
        self.bin.mkdir(parents=True)
        self.job_dir = tmp_path / "job"
        self.job_dir.mkdir()
        log, listing, addopts = (self.dir / n for n in ("calls.log", "listing.log", "addopts.log"))
        self.log, self.listing, self.addopts_log = log, listing, addopts
        venv_python = self.dir / "venv-python"

        def record(name: str) -> str:
            return f"{{ printf %s {name}; printf '\\t%s' \"$@\"; printf '\\n'; }} >> {log}"

        scripts = {
            self.bin / "apt-get": record("apt-get"),
            self.bin / "npm": record("npm") + f"\npwd >> {self.dir / 'npm-cwd.log'}",
            self.bin / "python3": record("python3")
            + f"""
                [ "$1 $2" = "-m venv" ] || exit 99
                mkdir -p "$3/bin" && cp {venv_python} "$3/bin/python"
                """,
            venv_python: record('"$0"')
            + f"""
                if [ "$2" = pytest ]; then
                  printf '%s\\n' "${{PYTEST_ADDOPTS-}}" >> {addopts}
                  prev=""
                  for arg in "$@"; do
                    [ "$prev" != --inventory ] || ls -l "$(dirname "$arg")" >> {listing}
                    prev=$arg
                  done
                  exit {verify_rc}
                fi
                [ "$2" != opsdrill_pytest.report ] || exit {report_rc}
                """,
        }
        for path, body in scripts.items():
            path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body).strip() + "\n")
            path.chmod(0o755)

    def run(self, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """A job's script as the runner's bash runs it, in the job's directory."""
        return subprocess.run(
            ["bash", "-eo", "pipefail", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.job_dir,
        )

    def calls(self) -> list[list[str]]:
        text = self.log.read_text() if self.log.exists() else ""
        return [line.split("\t") for line in text.splitlines()]

    def apt_packages(self) -> list[str]:
        (call,) = [c for c in self.calls() if c[:2] == ["apt-get", "install"]]
        return [word for word in call[2:] if not word.startswith("-")]

    def npm_call(self) -> list[str]:
        """npm installs the Allure opsdrill is tested with, in the job's directory."""
        assert (self.dir / "npm-cwd.log").read_text().split() == [str(self.job_dir)]
        version = report_module.ALLURE_VERSION
        return [
            "npm",
            "install",
            "--no-save",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            f"allure@{version}",
        ]

    def addopts(self) -> list[list[str]]:
        return [shlex.split(line) for line in self.addopts_log.read_text().splitlines()]

    def assert_private_key_files(self) -> None:
        """What the check run saw next to its inventory: the key files, owner-only."""
        listing = self.listing.read_text()
        for name in ("inventory.toml", "backup-recipients.pub.asc", "drill.sec.asc"):
            assert re.search(rf"^-rw------- .* {re.escape(name)}$", listing, re.M), listing


# GitHub Actions ------------------------------------------------------------------------


def test_github_templates_match_the_official_schema() -> None:
    assert GITHUB_FILES, "no GitHub workflow templates"
    _check_jsonschema("vendor.github-workflows", *GITHUB_FILES)


def _check_jsonschema(schema: str, *files: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_github_schedules_hourly_checks_and_weekly_drill() -> None:
    kinds: dict[str, str] = {}
    for path in GITHUB_FILES:
        workflow = _load(path)
        for entry in _on(workflow).get("schedule") or []:
            kind = _kind(entry["cron"])
            assert kind != "other", f"{path.name}: {entry['cron']}"
            kinds[kind] = _markers_of(workflow)
    assert kinds == {"hourly": HOURLY, "weekly": "drill"}


def _markers_of(workflow: dict[str, Any]) -> str:
    (job,) = workflow["jobs"].values()
    return str(job["with"]["markers"])


def test_github_migration_runs_on_demand_with_dns_or_migration() -> None:
    workflow = _load(GITHUB / "opsdrill-migration.yml")
    triggers = _on(workflow)
    assert set(triggers) == {"workflow_dispatch"}
    choice = triggers["workflow_dispatch"]["inputs"]["checks"]
    assert choice["type"] == "choice"
    assert set(choice["options"]) == {"dns", "migration"}
    assert _markers_of(workflow) == "${{ inputs.checks }}"


def test_github_every_job_verifies_reports_and_publishes() -> None:
    for path in GITHUB_FILES:
        for name, job in _load(path)["jobs"].items():
            if "uses" in job:  # a caller: the reusable workflow does the work
                assert job["uses"] == f"./.github/workflows/{RUN_WORKFLOW}", (path, name)
                assert job.get("secrets") == "inherit", (path, name)
                assert {"markers", "history-key"} <= set(job["with"]), (path, name)
                continue
            assert path.name == RUN_WORKFLOW, f"{path.name}: job {name} runs its own steps"
            _assert_run_job(job)


def _assert_run_job(job: dict[str, Any]) -> None:
    steps = job["steps"]
    runs = [str(s.get("run", "")) for s in steps]

    def index(predicate: Any) -> int:
        found = [i for i, s in enumerate(steps) if predicate(s)]
        assert len(found) == 1, found
        return found[0]

    def running(module: str) -> Any:
        return lambda s: any(c[1] == module for c in _python_commands(str(s.get("run", ""))))

    install = index(running("pip"))
    checks = index(running("pytest"))
    report = index(running("opsdrill_pytest.report"))
    restore = index(lambda s: str(s.get("uses", "")).startswith("actions/cache/restore@"))
    save = index(lambda s: str(s.get("uses", "")).startswith("actions/cache/save@"))
    assert install < restore < checks < report < save
    # The installed form: nothing checked out, no make.
    assert not [s for s in steps if str(s.get("uses", "")).startswith("actions/checkout@")]
    assert not [r for r in runs if _runs_make(r)]
    assert steps[install]["env"]["OPSDRILL_PACKAGE"] == "${{ vars.OPSDRILL_PACKAGE }}"
    assert _python_commands(runs[checks]) == [
        _checks_argv("$OPSDRILL_INVENTORY_FILE", "$OPSDRILL_RUNBOOK_BASE_URL")
    ]
    assert _python_commands(runs[report]) == [REPORT_ARGV]
    # The checks' selection is data, not script text (no expression injection).
    assert steps[checks]["env"]["PYTEST_ADDOPTS"] == '-m "${{ inputs.markers }}"'
    assert "${{" not in runs[checks]
    for i in (report, save):
        assert steps[i]["if"] in ("${{ !cancelled() }}", "${{ always() }}"), steps[i]
    assert steps[restore]["with"]["path"] == steps[save]["with"]["path"] == HISTORY
    assert steps[save]["with"]["key"] == steps[restore]["with"]["key"]
    assert steps[restore]["with"]["restore-keys"] in steps[restore]["with"]["key"]
    uploaded: set[str] = set()
    for step in steps:
        if str(step.get("uses", "")).startswith("actions/upload-artifact@"):
            assert step["if"] in ("${{ !cancelled() }}", "${{ always() }}"), step
            uploaded.update(str(step["with"]["path"]).split())
    assert PUBLISHED | {HISTORY} <= uploaded


def test_github_secrets_only_from_the_secret_store() -> None:
    run = _load(GITHUB / RUN_WORKFLOW)
    job = run["jobs"]["verify"]
    envs = [job.get("env", {})] + [s.get("env", {}) for s in job["steps"]]
    from_store = set()
    for env in envs:
        for key, value in env.items():
            if SECRETISH.search(key):
                assert value == f"${{{{ secrets.{key} }}}}", f"{key}: {value!r}"
                from_store.add(key)
    # Every variable the example inventory names is supplied from the store.
    assert _inventory_secret_names() <= from_store
    for path in GITHUB_FILES:
        _assert_no_literal_secrets(path.read_text(), path)
        for job in _load(path)["jobs"].values():
            for step in job.get("steps", []):
                _assert_not_echoed(str(step.get("run", "")), from_store)


def _assert_no_literal_secrets(text: str, where: Path) -> None:
    for pattern in (
        r"BEGIN PGP",
        r"AKIA[0-9A-Z]{16}",
        r"(?i)(password|secret|passphrase|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{8,}",
        r"\bset\s+-[a-z]*x",
    ):
        assert not re.search(pattern, text), f"{where}: {pattern}"


def _assert_not_echoed(script: str, secrets: set[str]) -> None:
    """A command printing a secret variable must send it to a file, not to the log."""
    for command in re.split(r"\n|;|&&|\|\|", script):
        if re.search(r"\b(echo|printf|cat)\b", command):
            for name in secrets:
                if f"${name}" in command or f"${{{name}}}" in command:
                    assert re.search(r">\s*\S", command), f"{name} may be printed: {command}"


def test_github_inventory_step_writes_private_files(tmp_path: Path) -> None:
    job = _load(GITHUB / RUN_WORKFLOW)["jobs"]["verify"]
    (step,) = [s for s in job["steps"] if "OPSDRILL_INVENTORY" in s.get("env", {})]
    github_env = tmp_path / "github_env"
    env = {
        "PATH": os.environ["PATH"],
        "RUNNER_TEMP": str(tmp_path),
        "GITHUB_ENV": str(github_env),
        "OPSDRILL_INVENTORY": 'name = "ci"',
        "OPSDRILL_GPG_PUBLIC_KEYS": "public keys",
        "OPSDRILL_DRILL_PRIVATE_KEY": "private key",
    }
    proc = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", step["run"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    written = dict(line.split("=", 1) for line in github_env.read_text().splitlines())
    inventory = Path(written["OPSDRILL_INVENTORY_FILE"])
    assert inventory.read_text() == 'name = "ci"\n'
    for name in ("inventory.toml", "backup-recipients.pub.asc", "drill.sec.asc"):
        assert stat.S_IMODE((inventory.parent / name).stat().st_mode) == 0o600, name
    assert (inventory.parent / "drill.sec.asc").read_text() == "private key\n"


@pytest.mark.parametrize(
    ("verify_rc", "report_rc", "job_failed"), [(0, 0, False), (1, 0, True), (0, 2, True)]
)
def test_github_job_installs_runs_checks_and_reports(
    tmp_path: Path, verify_rc: int, report_rc: int, job_failed: bool
) -> None:
    """The job's run steps in order, as the runner does them (GITHUB_ENV, GITHUB_PATH, `if`),
    with apt-get, npm and the venv's python stubbed: what runs, with which files."""
    job = _load(GITHUB / RUN_WORKFLOW)["jobs"]["verify"]
    stubs = _Stubs(tmp_path, verify_rc=verify_rc, report_rc=report_rc)
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir()
    github_env, github_path = tmp_path / "github_env", tmp_path / "github_path"
    github_env.touch()
    github_path.touch()
    values = {
        "secrets": {
            "OPSDRILL_INVENTORY": 'name = "ci"',
            "OPSDRILL_GPG_PUBLIC_KEYS": "public",
            "OPSDRILL_DRILL_PRIVATE_KEY": "private",
            **{name: "s3cr3t-value" for name in _inventory_secret_names()},
        },
        "vars": {"OPSDRILL_PACKAGE": PACKAGE},
        "inputs": {"markers": HOURLY},
    }
    base = {
        "PATH": f"{stubs.bin}:{os.environ['PATH']}",
        "RUNNER_TEMP": str(runner_temp),
        "GITHUB_ENV": str(github_env),
        "GITHUB_PATH": str(github_path),
        **_github_env(job.get("env", {}), values),
    }
    failed, output = False, ""
    for step in job["steps"]:
        if "run" not in step:
            continue
        if failed and step.get("if") not in ("${{ !cancelled() }}", "${{ always() }}"):
            continue
        env = {**base, **_github_env(step.get("env", {}), values)}
        env.update(line.split("=", 1) for line in github_env.read_text().splitlines())
        added = github_path.read_text().split()
        env["PATH"] = ":".join([*reversed(added), env["PATH"]])
        proc = stubs.run(step["run"], env)
        output += proc.stdout + proc.stderr
        failed = failed or proc.returncode != 0
    assert failed == job_failed, output
    venv = runner_temp / "opsdrill-venv"
    assert github_path.read_text().split() == [str(venv / "bin")]
    inventory = runner_temp / "opsdrill" / "inventory.toml"
    assert stubs.calls() == [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *stubs.apt_packages()],
        ["python3", "-m", "venv", str(venv)],
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            PACKAGE,
        ],
        stubs.npm_call(),
        [str(venv / "bin/python"), *_checks_argv(str(inventory))],
        [str(venv / "bin/python"), *REPORT_ARGV],
    ]
    assert set(stubs.apt_packages()) >= DEBIAN
    assert stubs.addopts() == [["-m", HOURLY]]
    stubs.assert_private_key_files()
    assert not (runner_temp / "opsdrill").exists()  # the key material is removed
    assert "private" not in output and "s3cr3t" not in output


def _github_env(env: dict[str, Any], values: dict[str, dict[str, str]]) -> dict[str, str]:
    """An env: mapping with its ${{ secrets.X }}, ${{ vars.X }}, ${{ inputs.x }} evaluated."""

    def value(found: re.Match[str]) -> str:
        return values[found.group(1)].get(found.group(2), "")

    expr = re.compile(r"\$\{\{\s*(secrets|vars|inputs)\.([\w-]+)\s*\}\}")
    return {key: expr.sub(value, str(raw)) for key, raw in env.items()}


def test_github_install_step_requires_the_package_variable(tmp_path: Path) -> None:
    job = _load(GITHUB / RUN_WORKFLOW)["jobs"]["verify"]
    (step,) = [s for s in job["steps"] if "OPSDRILL_PACKAGE" in s.get("env", {})]
    stubs = _Stubs(tmp_path)
    env = {
        "PATH": f"{stubs.bin}:{os.environ['PATH']}",
        "RUNNER_TEMP": str(tmp_path),
        "GITHUB_PATH": str(tmp_path / "github_path"),
        "OPSDRILL_PACKAGE": "",  # the repository variable is not set
    }
    proc = stubs.run(step["run"], env)
    assert proc.returncode != 0
    assert "set the repository variable OPSDRILL_PACKAGE" in proc.stderr
    assert not [c for c in stubs.calls() if c[1:3] == ["-m", "pip"]]


# GitLab CI -----------------------------------------------------------------------------


def _gitlab_jobs() -> dict[str, dict[str, Any]]:
    """The runnable jobs with `extends` resolved (GitLab's deep merge of mappings)."""
    config = _load(GITLAB)
    jobs = {}
    for name, job in config.items():
        if name.startswith(".") or not isinstance(job, dict) or "extends" not in job:
            continue
        base = config[job["extends"]]
        jobs[name] = _merge(base, job)
    return jobs


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def test_gitlab_template_matches_the_official_schema() -> None:
    _check_jsonschema("vendor.gitlab-ci", GITLAB)


def test_gitlab_scripts_are_plain_strings() -> None:
    # `- a || b=$((x ? y : 1))` parses as a mapping: the schema accepts it, GitLab does not.
    for name, job in _gitlab_jobs().items():
        for key in ("before_script", "script", "after_script"):
            for line in job.get(key, []):
                assert isinstance(line, str), f"{name}.{key}: {line!r}"


def test_gitlab_schedules_and_manual_migration() -> None:
    config = _load(GITLAB)
    assert {"if": '$CI_PIPELINE_SOURCE == "schedule"'} in config["workflow"]["rules"]
    jobs = _gitlab_jobs()
    by_rule = {}
    for name, job in jobs.items():
        (rule,) = job["rules"]
        by_rule[name] = (rule["if"], rule.get("when"), job["variables"]["OPSDRILL_MARKERS"])
    schedule = '$CI_PIPELINE_SOURCE == "schedule" && $OPSDRILL_SCHEDULE == "{}"'
    assert by_rule == {
        "hourly-checks": (schedule.format("hourly"), None, HOURLY),
        "weekly-drill": (schedule.format("weekly-drill"), None, "drill"),
        "migration-checks": (
            '$CI_PIPELINE_SOURCE == "web" && $OPSDRILL_MIGRATION_CHECKS =~ /^(migration|dns)$/',
            "manual",
            "$OPSDRILL_MIGRATION_CHECKS",
        ),
    }
    choice = config["variables"]["OPSDRILL_MIGRATION_CHECKS"]
    assert set(choice["options"]) == {"migration", "dns"}
    # The schedules are created in GitLab's UI: the header documents their cron and variable.
    documented = re.findall(r'cron "([^"]+)"\s+OPSDRILL_SCHEDULE=(\S+)', GITLAB.read_text())
    assert {value: _kind(cron) for cron, value in documented} == {
        "hourly": "hourly",
        "weekly-drill": "weekly",
    }


def test_gitlab_every_job_publishes_the_report_and_keeps_history() -> None:
    for name, job in _gitlab_jobs().items():
        artifacts = job["artifacts"]
        assert artifacts["when"] == "always", name
        assert PUBLISHED | {HISTORY} <= {p.rstrip("/") for p in artifacts["paths"]}, name
        cache = job["cache"]
        assert cache["paths"] == [HISTORY] and cache["when"] == "always", name
        assert "$OPSDRILL_HISTORY_KEY" in cache["key"] and job["variables"]["OPSDRILL_HISTORY_KEY"]


def _gitlab_env(stubs: _Stubs, tmp_path: Path, **variables: str) -> dict[str, str]:
    """The job's environment: its variables, the File variables as paths, a private TMPDIR."""
    config = _load(GITLAB)
    job = _gitlab_jobs()["hourly-checks"]
    files = {}
    for var, text in [
        ("OPSDRILL_INVENTORY", 'name = "ci"\n'),
        ("OPSDRILL_GPG_PUBLIC_KEYS", "public"),
        ("OPSDRILL_DRILL_PRIVATE_KEY", "private"),
    ]:
        files[var] = tmp_path / var.lower()
        files[var].write_text(text)
    (tmp_path / "tmp").mkdir()
    return {
        "PATH": f"{stubs.bin}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path / "tmp"),
        **{k: str(v) for k, v in config["variables"].items() if isinstance(v, str)},
        **{k: str(v) for k, v in job["variables"].items()},
        **{k: str(v) for k, v in files.items()},
        **variables,
    }


@pytest.mark.parametrize(("verify_rc", "report_rc", "job_rc"), [(0, 0, 0), (1, 0, 1), (0, 2, 1)])
def test_gitlab_job_script_reports_even_when_checks_fail(
    tmp_path: Path, verify_rc: int, report_rc: int, job_rc: int
) -> None:
    """The job's shell, with apt-get, npm and the venv's python stubbed: what runs, with
    which files, and the job's status (the checks', or 1 when only the report failed)."""
    job = _gitlab_jobs()["hourly-checks"]
    stubs = _Stubs(tmp_path, verify_rc=verify_rc, report_rc=report_rc)
    env = _gitlab_env(stubs, tmp_path, OPSDRILL_PACKAGE=PACKAGE)
    proc = stubs.run("\n".join(job["before_script"] + job["script"]), env)
    assert proc.returncode == job_rc, proc.stdout + proc.stderr
    calls = stubs.calls()
    venv = Path(calls[2][-1])
    assert venv.parent == tmp_path / "tmp"
    inventory = calls[5][calls[5].index("--inventory") + 1]
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'tmp'))}/tmp\.\w+/inventory\.toml", inventory)
    python = str(venv / "bin" / "python")
    assert calls == [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *stubs.apt_packages()],
        ["python3", "-m", "venv", str(venv)],
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", PACKAGE],
        stubs.npm_call(),
        [python, *_checks_argv(inventory)],
        [python, *REPORT_ARGV],
    ]
    assert set(stubs.apt_packages()) >= DEBIAN
    assert stubs.addopts() == [["-m", HOURLY]]
    stubs.assert_private_key_files()
    assert not Path(inventory).parent.exists()  # the key material is removed
    assert "private" not in proc.stdout + proc.stderr


def test_gitlab_job_requires_the_package_variable(tmp_path: Path) -> None:
    job = _gitlab_jobs()["hourly-checks"]
    stubs = _Stubs(tmp_path)
    proc = stubs.run("\n".join(job["before_script"] + job["script"]), _gitlab_env(stubs, tmp_path))
    assert proc.returncode != 0
    assert "set the CI/CD variable OPSDRILL_PACKAGE" in proc.stderr
    assert not [c for c in stubs.calls() if c[1:3] in (["-m", "pip"], ["-m", "pytest"])]


def test_gitlab_job_checks_nothing_out() -> None:
    """opsdrill comes from pip and the inventory from File variables: no clone, no make."""
    assert _load(GITLAB)["variables"]["GIT_STRATEGY"] == "none"
    for name, job in _gitlab_jobs().items():
        assert not _runs_make("\n".join(job["before_script"] + job["script"])), name


def test_gitlab_secrets_only_from_ci_variables() -> None:
    text = GITLAB.read_text()
    _assert_no_literal_secrets(text, GITLAB)
    config = _load(GITLAB)
    variables = dict(config.get("variables", {}))
    for job in _gitlab_jobs().values():
        variables.update(job.get("variables", {}))
    assert not [k for k in variables if SECRETISH.search(k)], variables
    # The names the inventory uses are documented for the CI/CD variables page.
    assert _inventory_secret_names() <= set(re.findall(r"\bOPSDRILL_[A-Z_]+", text))
    secrets = _inventory_secret_names() | {"OPSDRILL_DRILL_PRIVATE_KEY", "OPSDRILL_INVENTORY"}
    for job in _gitlab_jobs().values():
        _assert_not_echoed("\n".join(job["before_script"] + job["script"]), secrets)


# The commands the templates run exist ----------------------------------------------------


def _template_scripts() -> dict[str, str]:
    out = {}
    for path in GITHUB_FILES:
        for name, job in _load(path)["jobs"].items():
            runs = [str(s.get("run", "")) for s in job.get("steps", [])]
            out[f"{path.name}:{name}"] = "\n".join(runs)
    for name, job in _gitlab_jobs().items():
        out[f".gitlab-ci.yml:{name}"] = "\n".join(job["before_script"] + job["script"])
    return {k: v for k, v in out.items() if v.strip()}


def test_the_templates_run_the_installed_modules() -> None:
    scripts = _template_scripts()
    assert {k.split(":")[0] for k in scripts} == {RUN_WORKFLOW, ".gitlab-ci.yml"}
    for where, script in scripts.items():
        modules = {command[1] for command in _python_commands(script)}
        assert modules == {"venv", "pip", "pytest", "opsdrill_pytest.report"}, where
    # What the venv's python runs is importable there (opsdrill's wheel and dependencies).
    for module in (
        "pytest",
        "xdist",
        "allure_pytest",
        "opsdrill_checks",
        "opsdrill_pytest.report.__main__",
    ):
        assert importlib.util.find_spec(module) is not None, module


def test_the_report_actions_the_templates_run_exist() -> None:
    for where, script in _template_scripts().items():
        for command in _python_commands(script):
            if command[1] == "opsdrill_pytest.report":
                assert command[2:] == ["generate"], where
    assert report_module.ACTIONS == ("generate", "serve")
    assert report_module.SCRIPT.is_file() and report_module.CONFIG.is_file()
    makefile = (ROOT / "Makefile").read_text()
    for action in report_module.ACTIONS:
        assert f"$(BIN)/python -m opsdrill_pytest.report {action}" in makefile


def test_the_pytest_options_the_templates_use_exist(tmp_path: Path) -> None:
    """Every option of the check run is pytest's, xdist's, allure-pytest's or the plugin's
    (loaded through its entry point, as in the user's venv); --dist knows loadgroup."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for where, script in _template_scripts().items():
        (checks,) = [c for c in _python_commands(script) if c[1] == "pytest"]
        for option in (word for word in checks[2:] if word.startswith("-")):
            assert re.search(rf"(?:^|[ ,]){re.escape(option)}[ =,\n]", proc.stdout, re.M), (
                where,
                option,
            )
        assert checks[checks.index("--dist") + 1] == "loadgroup"
        assert checks[checks.index("--pyargs") + 1] == "opsdrill_checks"
    assert re.search(r"^\s+loadgroup:", proc.stdout, re.M)


def test_the_templates_install_the_allure_opsdrill_is_tested_with() -> None:
    package = json.loads((ROOT / "package.json").read_text())
    assert package["devDependencies"]["allure"] == report_module.ALLURE_VERSION
    lock = json.loads((ROOT / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/allure"]["version"] == report_module.ALLURE_VERSION
    for where, script in _template_scripts().items():
        assert _npm_allure_versions(script) == {report_module.ALLURE_VERSION}, where
        assert _apt_packages(script) >= DEBIAN, (where, DEBIAN - _apt_packages(script))
    for text in (GITLAB.read_text(), (GITHUB / RUN_WORKFLOW).read_text()):
        assert f"allure@{report_module.ALLURE_VERSION}" in text.split("\nname:")[0]  # header
        assert "OPSDRILL_PACKAGE" in text and "git+https://" in text


def test_the_debian_packages_exist() -> None:
    """Known to apt here (Debian 12, as the jobs' image); skipped without package lists."""
    apt_cache = shutil.which("apt-cache")
    if apt_cache is None:
        pytest.skip("no apt-cache")
    policy = subprocess.run(
        [apt_cache, "policy", *sorted(DEBIAN)], capture_output=True, text=True, timeout=60
    )
    if not re.search(r"^\s+\d+ \S+://", policy.stdout, re.M):  # no repository listed
        pytest.skip("no apt package lists (apt-get update)")
    for name in DEBIAN:
        found = re.search(
            rf"^{re.escape(name)}:\n\s+Installed: .*\n\s+Candidate: (.*)$", policy.stdout, re.M
        )
        assert found and found.group(1) != "(none)", (name, policy.stdout)


# python -m opsdrill_pytest.report: where it finds Allure ----------------------------------


def _fake_cli(root: Path) -> Path:
    cli = root / "node_modules" / "allure" / "cli.js"
    cli.parent.mkdir(parents=True)
    cli.write_text("// allure\n")
    return cli


def test_report_finds_allure_from_the_variable_the_directory_then_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "opsdrill_pytest" / "report").mkdir(parents=True)
    monkeypatch.setattr(report_main, "HERE", checkout / "opsdrill_pytest" / "report")
    monkeypatch.delenv("ALLURE_CLI", raising=False)
    job = tmp_path / "job"
    job.mkdir()
    assert report_main.find_allure_cli(job) is None
    in_checkout = _fake_cli(checkout)
    assert report_main.find_allure_cli(job) is None  # not a checkout: no package.json
    (checkout / "package.json").write_text("{}")
    assert report_main.find_allure_cli(job) == in_checkout
    in_job = _fake_cli(job)
    assert report_main.find_allure_cli(job) == in_job
    monkeypatch.setenv("ALLURE_CLI", str(tmp_path / "elsewhere.js"))
    assert report_main.find_allure_cli(job) == tmp_path / "elsewhere.js"


def test_report_without_allure_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        report_main, "HERE", tmp_path / "site-packages" / "opsdrill_pytest" / "report"
    )
    monkeypatch.delenv("ALLURE_CLI", raising=False)
    monkeypatch.delenv("ALLURE_REPORT", raising=False)
    monkeypatch.chdir(tmp_path)
    for action in report_module.ACTIONS:  # serve generates a missing report first
        assert report_main.main([action]) == 2
        assert f"run `npm install allure@{report_module.ALLURE_VERSION}`" in capsys.readouterr().err
    monkeypatch.setenv("ALLURE_CLI", str(tmp_path / "missing.js"))
    assert report_main.main(["generate"]) == 2
    assert f"ALLURE_CLI={tmp_path / 'missing.js'} does not exist" in capsys.readouterr().err
    assert report_main.main(["publish"]) == 2
    assert "usage: python -m opsdrill_pytest.report generate|serve" in capsys.readouterr().err


def test_report_without_results_exits_2_naming_them(tmp_path: Path) -> None:
    """The module hands over to the shipped script (run as a user would), which refuses an
    empty results directory before starting Allure."""
    cli = _fake_cli(tmp_path)
    env = {**os.environ, "ALLURE_CLI": str(cli), "ALLURE_RESULTS": "nothing-here"}
    proc = subprocess.run(
        [sys.executable, "-m", "opsdrill_pytest.report", "generate"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no test results in nothing-here" in proc.stderr
    assert not (tmp_path / "reports").exists()
