"""The CI templates in ci-templates/: valid for GitHub Actions and GitLab CI (their official
JSON schemas, vendored by check-jsonschema), and doing what the schedules promise: hourly
checks, a weekly drill, a manual migration run, each building and publishing the Allure
report with its history, secrets only from the CI's secret store."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GITHUB = ROOT / "ci-templates" / "github-actions"
GITLAB = ROOT / "ci-templates" / "gitlab-ci" / ".gitlab-ci.yml"
GITHUB_FILES = sorted(GITHUB.glob("*.yml"))
RUN_WORKFLOW = "opsdrill-run.yml"
PUBLISHED = {"reports/allure-results", "reports/allure-report-single/index.html"}
HISTORY = "reports/history.jsonl"
HOURLY = "not drill and not migration"
SECRETISH = re.compile(r"PASSWORD|PASSPHRASE|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|INVENTORY")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def _on(workflow: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the key `on` as True.
    triggers = workflow.get("on", workflow.get(True))
    assert isinstance(triggers, dict), workflow
    return triggers


def _makefile_targets() -> set[str]:
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9_./$()-][^:=#\t]*?)\s*:(?!=)", line)
        if found and not line.startswith("\t"):
            targets.update(found.group(1).split())
    return targets


def _make_targets_in(script: str) -> set[str]:
    out: set[str] = set()
    # `make` where a command starts (after optional VAR=value assignments).
    command_start = r"(?:^|&&|\|\||;|\{)\s*"
    assignments = r"""(?:[A-Z_]+=(?:"(?:[^"\\]|\\.)*"|\S+)\s+)*"""
    for command in re.findall(command_start + assignments + r"make\s+([^|;&\n>]*)", script, re.M):
        out.update(w for w in shlex.split(command) if "=" not in w and not w.startswith("-"))
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

    setup = index(lambda s: "make setup" in str(s.get("run", "")))
    verify = index(lambda s: "make verify" in str(s.get("run", "")))
    report = index(lambda s: str(s.get("run", "")).strip() == "make report")
    restore = index(lambda s: str(s.get("uses", "")).startswith("actions/cache/restore@"))
    save = index(lambda s: str(s.get("uses", "")).startswith("actions/cache/save@"))
    assert setup < restore < verify < report < save
    # The checks' selection is data, not script text (no expression injection).
    assert steps[verify]["env"]["PYTEST_ADDOPTS"] == '-m "${{ inputs.markers }}"'
    assert "${{" not in runs[verify]
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


def test_github_make_targets_exist() -> None:
    targets = _makefile_targets()
    used: set[str] = set()
    for path in GITHUB_FILES:
        for job in _load(path)["jobs"].values():
            for step in job.get("steps", []):
                used |= _make_targets_in(str(step.get("run", "")))
    assert {"setup", "report-deps", "verify", "report"} <= used
    assert used <= targets, used - targets


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


@pytest.mark.parametrize(("verify_rc", "report_rc", "job_rc"), [(0, 0, 0), (1, 0, 1), (0, 2, 1)])
def test_gitlab_job_script_reports_even_when_checks_fail(
    tmp_path: Path, verify_rc: int, report_rc: int, job_rc: int
) -> None:
    """The job's shell, with make and apt-get stubbed: what runs, with which files."""
    job = _gitlab_jobs()["hourly-checks"]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "make.log"
    (stubs / "apt-get").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "make").write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            echo "make $*|$PYTEST_ADDOPTS" >> {log}
            for arg in "$@"; do
              case "$arg" in INVENTORY=*) ls -l "$(dirname "${{arg#INVENTORY=}}")" >> {log} ;; esac
            done
            case "$1" in
              verify) exit {verify_rc} ;;
              report) exit {report_rc} ;;
            esac
            """
        )
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    files = {}
    for var, text in [
        ("OPSDRILL_INVENTORY", 'name = "ci"\n'),
        ("OPSDRILL_GPG_PUBLIC_KEYS", "public"),
        ("OPSDRILL_DRILL_PRIVATE_KEY", "private"),
    ]:
        files[var] = tmp_path / var.lower()
        files[var].write_text(text)
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        **{k: str(v) for k, v in job["variables"].items()},
        **{k: str(v) for k, v in files.items()},
    }
    script = "\n".join(job["before_script"] + job["script"])
    proc = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == job_rc, proc.stdout + proc.stderr
    lines = log.read_text().splitlines()
    calls = [line.split("|")[0] for line in lines if line.startswith("make ")]
    assert calls[0] == "make setup report-deps"
    assert re.fullmatch(r"make verify INVENTORY=/.*/inventory\.toml", calls[1])
    assert calls[2:] == ["make report"]
    addopts = lines[lines.index(next(x for x in lines if x.startswith("make verify")))]
    assert shlex.split(addopts.split("|", 1)[1]) == ["-m", HOURLY]
    listing = "\n".join(line for line in lines if not line.startswith("make "))
    for name in ("inventory.toml", "backup-recipients.pub.asc", "drill.sec.asc"):
        assert re.search(rf"^-rw------- .* {re.escape(name)}$", listing, re.M), listing
    assert "private" not in proc.stdout + proc.stderr


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


def test_gitlab_make_targets_exist() -> None:
    used: set[str] = set()
    for job in _gitlab_jobs().values():
        used |= _make_targets_in("\n".join(job["before_script"] + job["script"]))
    assert {"setup", "report-deps", "verify", "report"} <= used
    assert used <= _makefile_targets(), used - _makefile_targets()
