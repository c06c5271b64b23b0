"""The product as a user installs it: the wheel carries the library, the pytest plugin (a
``pytest11`` entry point) and the checks, and not the local stack nor our tests; the
checks then run from any directory with ``pytest --pyargs opsdrill_checks --inventory``."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, Stack, run_pytest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools builds in the source tree (build/, *.egg-info): build from a copy
    source = tmp_path_factory.mktemp("source")
    shutil.copy(ROOT / "pyproject.toml", source)
    for package in ("opsdrill", "opsdrill_pytest", "opsdrill_checks"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("-q", "--disable-pip-version-check", "-w", str(out), str(source)),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = out.glob("opsdrill-*.whl")
    return found


def test_the_wheel_ships_library_plugin_and_checks_but_no_stack_or_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.startswith("opsdrill-")}
    assert tops == {"opsdrill", "opsdrill_pytest", "opsdrill_checks"}
    checks = {Path(n).name for n in names if n.startswith("opsdrill_checks/check_")}
    assert checks == {p.name for p in (ROOT / "opsdrill_checks").glob("check_*.py")}
    assert "opsdrill_pytest/categories.json" in names
    # the report tooling: python -m opsdrill_pytest.report generate|serve, anywhere
    report = {n for n in names if n.startswith("opsdrill_pytest/report/")}
    assert report == {
        "opsdrill_pytest/report/__init__.py",
        "opsdrill_pytest/report/__main__.py",
        "opsdrill_pytest/report/report.sh",
        "opsdrill_pytest/report/allurerc.mjs",
    }
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    parsed = configparser.ConfigParser()
    parsed.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    assert dict(parsed["pytest11"]) == {
        "opsdrill": "opsdrill_pytest.plugin",
        "opsdrill_outcomes": "opsdrill_pytest.outcomes",
    }
    assert parsed["console_scripts"]["opsdrill"] == "opsdrill.cli:main"


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel installed as pip would (unpacked into
    site-packages), its dependencies borrowed from ours through a .pth line (offline,
    seconds): no checkout, no editable finder, no local stack. Its python."""
    env = tmp_path_factory.mktemp("user-env")
    venv.create(env, with_pip=False)
    purelib = sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)})
    zipfile.ZipFile(wheel).extractall(purelib)
    (Path(purelib) / "borrowed-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return env / "bin" / "python"


def test_checks_run_from_any_directory_by_package_name(
    installed: Path, stack: Stack, tmp_path: Path
) -> None:
    """A user's own repository: no opsdrill configuration, no conftest; only the
    inventory. The plugin comes from its entry point, the checks from the package."""
    elsewhere = tmp_path / "ops-repo"
    elsewhere.mkdir()
    results = tmp_path / "results"
    argv = [str(installed), "-m", "pytest", "--pyargs", "opsdrill_checks", "-m", "dns"]
    argv += ["--inventory", str(stack.inventory_path), "-p", "no:cacheprovider"]
    argv += ["--strict-markers", "-v", "--alluredir", str(results)]
    run = run_pytest(argv, results, cwd=elsewhere)
    assert run.returncode == 0, run.output
    assert "configfile:" not in run.output  # nothing of ours configured the run
    assert str(ROOT / "opsdrill_checks") not in run.output  # the installed checks ran
    ids = {
        label["value"] for r in run.results for label in r["labels"] if label["name"] == "check_id"
    }
    assert {"dns.spf.policy", "dns.dmarc.policy", "dns.mx"} <= ids
    # a skip says "not configured" (the stack has no discovery database): never a verdict
    assert {r["status"] for r in run.results} == {"passed", "skipped"}
    assert (results / "categories.json").exists()  # shipped with the plugin


def test_without_an_inventory_the_installed_checks_say_what_to_pass(
    installed: Path, tmp_path: Path
) -> None:
    """No --inventory and no local stack installed (the wheel has none): a usage error
    that names the option, not a run that examined nothing."""
    argv = [str(installed), "-m", "pytest", "--pyargs", "opsdrill_checks", "-p", "no:cacheprovider"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    assert "pass --inventory FILE" in done.stderr
    assert "local stack" in done.stderr


def test_a_users_own_check_named_helpers_are_not_collected(tmp_path: Path) -> None:
    """The plugin loads in every pytest of the environment; it teaches pytest the
    ``check_*`` names only for runs that collect opsdrill's checks."""
    (tmp_path / "test_own.py").write_text(
        "def check_helper():\n    raise AssertionError('collected')\n\n"
        "def test_own():\n    assert check_helper is not None\n"
    )
    (tmp_path / "check_not_ours.py").write_text("def test_x():\n    raise AssertionError\n")
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
