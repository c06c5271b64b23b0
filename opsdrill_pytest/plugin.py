"""The opsdrill pytest plugin: which inventory to verify, and the local stack's lifetime.

- ``--inventory FILE``: verify live targets described by FILE.
- no inventory: the local stack is started once, by the controller (or the only process),
  backed up with the real operations, verified, and stopped at the end. xdist workers get
  the stack's inventory path from the controller, so ``-n auto`` starts one stack, not N.
- Only the controller writes shared report files (Allure environment and categories), and
  the one result of a run that could not start (a malformed inventory): the report then
  shows why, instead of nothing or the previous run's results.
- ``--runbook-base-url URL``: each check's runbook link is that URL plus the runbook's
  path, clickable in a hosted report (without it the link is the relative path).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from opsdrill import __version__
from opsdrill.errors import ConfigError
from opsdrill.redact import redact

if TYPE_CHECKING:
    from opsdrill.config.inventory import Inventory

# The plugin loads in every pytest of the environment, before anything is known about the
# run: it imports only what registering options and hooks needs. The inventory model
# (pydantic), the targets (psycopg, minio, dnspython...) and the stack are imported when a
# run asks for them (issue 16: start-up before the first check).

INVENTORY_PATH = pytest.StashKey[str | None]()
INVENTORY = pytest.StashKey["Inventory"]()
STACK = pytest.StashKey[Any]()
STARTED = pytest.StashKey[datetime]()
RUNS_CHECKS = pytest.StashKey[bool]()
ROOT = Path(__file__).resolve().parent.parent  # the checkout, in a development install
PACKAGE = Path(__file__).resolve().parent
CHECKS_PACKAGE = "opsdrill_checks"
CONFIG_EXIT = 2
# The checks' markers, registered here so that a user's --strict-markers accepts them
# wherever the checks run from (their own repository has no opsdrill configuration).
MARKERS = {
    "backups": "PostgreSQL backup checks",
    "drill": "checks that restore a backup into the sandbox",
    "slow": "takes more than a few seconds",
    "storage": "files bucket mirror checks",
    "secrets": "application secrets bundle checks",
    "dns": "DNS authentication record checks",
    "migration": "email provider migration readiness checks",
    "mail": "email delivery probe and diagnosis checks",
    "check_id(id, runbook=path)": "stable id of an opsdrill check, its runbook",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("opsdrill")
    group.addoption("--inventory", metavar="FILE", help="verify the targets in this inventory")
    group.addoption(
        "--local-stack",
        choices=["auto", "always", "never"],
        default="auto",
        help="start the local stack when no --inventory is given (auto: when running the "
        "checks, opsdrill_checks)",
    )
    group.addoption("--stack-size-mb", type=int, default=8, help="demo database size")
    group.addoption(
        "--runbook-base-url",
        metavar="URL",
        help="where the repository's files are browsed (e.g. "
        "https://git.example.com/ops/opsdrill/-/blob/main/): runbook links in the Allure "
        "report become URL + docs/runbooks/...; without it they are relative paths",
    )


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _checks_dir() -> Path:
    """Where the checks package is, found without importing it (``--pyargs``-style)."""
    spec = importlib.util.find_spec(CHECKS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]).resolve() if locations else ROOT / CHECKS_PACKAGE


def _runs_checks(config: pytest.Config) -> bool:
    """Whether this run collects opsdrill's checks: by path (``pytest opsdrill_checks``,
    ``.../check_pg_drill.py::...``) or by package (``pytest --pyargs opsdrill_checks``)."""
    checks = _checks_dir()
    for arg in config.args:
        name = str(arg).split("::", 1)[0]
        if name == CHECKS_PACKAGE or name.startswith(CHECKS_PACKAGE + "."):
            return True
        path = Path(name).resolve()
        if path == checks or checks in path.parents:
            return True
    return False


def _collect_checks(config: pytest.Config) -> None:
    """Checks live in ``check_*.py`` as ``check_*`` functions: teach pytest these names for
    this run, whatever the rootdir's configuration says (none, in a user's repository).
    Only when the run collects the checks: the plugin is loaded by every pytest of the
    environment, and a user's own ``check_*`` helpers are not tests."""
    for option, pattern in (("python_files", "check_*.py"), ("python_functions", "check_*")):
        patterns = config.getini(option)
        if pattern not in patterns:
            patterns.append(pattern)


def pytest_configure(config: pytest.Config) -> None:
    for name, help_text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")
    config.stash[STARTED] = datetime.now(UTC)
    base = config.getoption("runbook_base_url")
    if base and (urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).netloc):
        raise pytest.UsageError(f"--runbook-base-url {base!r}: expected an http(s):// URL")
    if _is_worker(config):
        path = config.workerinput.get("opsdrill_inventory")  # type: ignore[attr-defined]
        runs_checks = bool(config.workerinput.get("opsdrill_runs_checks"))  # type: ignore[attr-defined]
    else:
        runs_checks = _runs_checks(config)
        path = config.getoption("inventory")
        mode = config.getoption("local_stack")
        if not path and (mode == "always" or (mode == "auto" and runs_checks)):
            path = str(_start_stack(config))
    config.stash[RUNS_CHECKS] = runs_checks
    if runs_checks:
        _collect_checks(config)
    config.stash[INVENTORY_PATH] = path
    if path:
        from opsdrill.config.inventory import load

        try:
            config.stash[INVENTORY] = load(path)
        except ConfigError as exc:
            # exit 2 like the CLI: "the configuration is wrong", not a failed check
            reason = f"opsdrill inventory: {exc.message}"
            if not _is_worker(config):
                _could_not_start(config, reason)
            pytest.exit(reason, returncode=CONFIG_EXIT)


def _could_not_start(config: pytest.Config, reason: str) -> None:
    """One broken Allure result saying why no check ran, so the report and its history
    show the gap. Written here because the run stops before allure-pytest writes anything;
    with --clean-alluredir the previous run's results go first, as they would have."""
    results = getattr(config.option, "allure_report_dir", None)
    if not results:
        return
    from allure_commons.logger import AllureFileLogger
    from allure_commons.model2 import Label, Status, StatusDetails, TestResult

    out = Path(results)
    if getattr(config.option, "clean_alluredir", False) and out.is_dir():
        shutil.rmtree(out, ignore_errors=True)
    now = int(time.time() * 1000)
    name = "opsdrill check run could not start"
    stable = hashlib.md5(b"opsdrill.check_run.start", usedforsecurity=False).hexdigest()
    labels = {
        "epic": "opsdrill",
        "feature": "check run",
        "suite": "check run",
        "severity": "blocker",
        "framework": "pytest",
        "language": "python",
    }
    result = TestResult(
        uuid=str(uuid.uuid4()),
        name=name,
        fullName="opsdrill.check_run#start",
        historyId=stable,
        testCaseId=stable,
        status=Status.BROKEN,
        statusDetails=StatusDetails(message=redact(reason)),
        start=now,
        stop=now,
        labels=[Label(name=k, value=v) for k, v in labels.items()],
    )
    AllureFileLogger(str(out)).report_result(result)  # makes the directory
    _write_run_files(config, out)


def _start_stack(config: pytest.Config) -> Path:
    try:
        from opsdrill_stack.local import LocalStack, prime
    except ModuleNotFoundError:
        raise pytest.UsageError(
            "no --inventory given and the local stack (opsdrill_stack, the repository's "
            "development tool) is not installed: pass --inventory FILE, or run from a "
            "checkout after make setup"
        ) from None

    stack = LocalStack(
        Path(tempfile.mkdtemp(prefix="opsdrill-stack-")), size_mb=config.getoption("stack_size_mb")
    )
    config.stash[STACK] = stack
    started = time.monotonic()
    path = stack.up()
    prime(path)  # the real operations: checks then verify what they produced
    stack.state["ready_seconds"] = round(time.monotonic() - started, 2)
    return path


def pytest_configure_node(node: Any) -> None:
    node.workerinput["opsdrill_inventory"] = node.config.stash.get(INVENTORY_PATH, None)
    node.workerinput["opsdrill_runs_checks"] = node.config.stash.get(RUNS_CHECKS, False)


def pytest_unconfigure(config: pytest.Config) -> None:
    stack = config.stash.get(STACK, None)
    if stack is not None:
        stack.down()


_BUILT: dict[int, tuple[Inventory, dict[str, list[Any]]]] = {}


def _targets(inv: Inventory) -> dict[str, list[Any]]:
    """Fixture name -> one facade per inventory target, each with a readable id.

    Built once per process and inventory: pytest parametrises each check function on its
    own, and a facade holds what its checks share (one drill per database, one analysis
    per domain, one probe run), so every check of a target must get the same object."""
    hit = _BUILT.get(id(inv))
    if hit is not None and hit[0] is inv:
        return hit[1]
    built = _build_targets(inv)
    _BUILT[id(inv)] = (inv, built)
    return built


def _build_targets(inv: Inventory) -> dict[str, list[Any]]:
    """Each area's facades, its modules imported only when the inventory has that area: a
    DNS-only inventory does not load the S3, PostgreSQL, Redis and IMAP clients (~0.3 s)."""
    model = inv.model
    built: dict[str, list[Any]] = {fixture: [] for fixture in TARGET_FIXTURES}
    if model.databases:
        from opsdrill_pytest.targets import pg_targets

        built["pg_target"] = pg_targets(inv)
    if model.mirrors or model.secrets:
        from opsdrill_pytest.files import BundleTarget, MirrorTarget

        built["mirror_target"] = [MirrorTarget(inv, n) for n in model.mirrors]
        built["bundle_target"] = [BundleTarget(inv, n) for n in model.secrets]
    if model.sending_domains or model.sending_domain_discovery:
        from opsdrill_pytest.dns import dns_targets

        dns = dns_targets(inv)  # built once per process: the checks of a domain share analyses
        built["dns_target"] = list(dns.domains)
        built["dkim_target"] = list(dns.selectors)
        built["discovery_target"] = list(dns.discovery)
        built["migration_target"] = list(dns.migrating)
    if model.probes or model.app_environment or model.queues:
        from opsdrill_pytest.mail import mail_targets

        mail = mail_targets(inv)  # likewise: the checks of a probe share its one run
        # every probe's received copy is judged (latency, DKIM, spam...); delivery is
        # checked per kind: direct (SMTP) or triggered (the application sends)
        built["probe_target"] = list(mail.probes)
        built["direct_probe_target"] = [p for p in mail.probes if p.kind == "direct"]
        built["app_probe_target"] = [p for p in mail.probes if p.kind == "triggered"]
        built["app_env_target"] = list(mail.app_envs)
        built["queue_target"] = list(mail.queues)
    return built


TARGET_FIXTURES = (
    "pg_target",
    "mirror_target",
    "bundle_target",
    "dns_target",
    "dkim_target",
    "discovery_target",
    "migration_target",
    "probe_target",
    "direct_probe_target",
    "app_probe_target",
    "app_env_target",
    "queue_target",
)
NOT_CONFIGURED = {
    "pg_target": "no [databases.*] in the inventory",
    "mirror_target": "no [mirrors.*] in the inventory",
    "bundle_target": "no [secrets.*] bundle in the inventory",
    "dns_target": "no [sending_domains] in the inventory",
    "dkim_target": "no DKIM selector is expected for any sending domain "
    "(sending_domains.*.dkim_selectors, or a mail provider's dkim_selectors)",
    "discovery_target": "no [sending_domain_discovery] in the inventory",
    "migration_target": "no sending domain is migrating between mail providers "
    "(no sending_domains.*.migration in the inventory)",
    "probe_target": "no [probes.*] in the inventory",
    "direct_probe_target": 'no direct probe (kind = "direct") in [probes]',
    "app_probe_target": "no application-triggered probe (trigger and expect) in [probes]",
    "app_env_target": "no [app_environment.*] in the inventory",
    "queue_target": "no [queues.*] in the inventory",
}
PROBE_FIXTURES = ("probe_target", "direct_probe_target", "app_probe_target")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    wanted = [f for f in TARGET_FIXTURES if f in metafunc.fixturenames]
    if not wanted:
        return
    inv = metafunc.config.stash.get(INVENTORY, None)
    if inv is None:
        raise pytest.UsageError(
            "opsdrill checks need targets: pass --inventory FILE, or run them with the "
            "local stack (--local-stack always)"
        )
    name = wanted[0]
    targets = _targets(inv)[name]
    if not targets:
        # An inventory without such targets skips these checks, saying why in words (not
        # pytest's "got empty parameter set"): a database-only inventory has no mirror.
        skip = pytest.mark.skip(reason=f"not configured: {NOT_CONFIGURED[name]}")
        metafunc.parametrize(name, [pytest.param(None, marks=skip, id="none")], scope="session")
        return
    metafunc.parametrize(name, targets, ids=[t.id for t in targets], scope="session")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Any:
    """Group checks for ``--dist loadgroup`` before xdist's own hook reads the markers (a
    wrapper runs around every plain implementation), and make sure the group reaches the
    scheduler afterwards (``_keep_group_suffix``)."""
    _group(items)
    result = yield
    _keep_group_suffix(config, items)
    if not _is_worker(config) and config.stash.get(INVENTORY, None) is not None:
        from opsdrill_pytest.dns import plan_analyses

        plan_analyses(_targets_of(items))
    return result


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Take what collection built out of the garbage collector's sight: every imported
    module and every item lives until the process exits, yet each full collection during
    the run, pytest's own at exit and the interpreter's at shutdown would walk it all again.
    A DNS run of 100 domains (1,500 checks) spent 0.65 s of its 3.1 s doing that."""
    gc.freeze()


def _target_params(item: pytest.Item) -> dict[str, Any]:
    """The item's target fixtures and their facades. An inventory without such targets
    parametrises with NOTSET (and skips): no ``.id``, not a target."""
    callspec = getattr(item, "callspec", None)
    return {k: v for k, v in (callspec.params if callspec else {}).items() if hasattr(v, "id")}


def _targets_of(items: list[pytest.Item]) -> list[tuple[str, Any]]:
    """(check module, target) for each selected item: what the run will examine."""
    found = []
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", "").rsplit(".", 1)[-1]
        found += [(module, value) for value in _target_params(item).values()]
    return found


def _group(items: list[pytest.Item]) -> None:
    # A drill restores a whole database: keep one target's drill checks on one worker so
    # the report is computed once and shared. Mirror checks that write canaries to the live
    # bucket share a worker with the parity checks they would otherwise disturb.
    for item in items:
        params = _target_params(item)
        if item.get_closest_marker("drill") and "pg_target" in params:
            item.add_marker(pytest.mark.xdist_group(f"drill-{params['pg_target'].id}"))
        if "mirror_target" in params:
            item.add_marker(pytest.mark.xdist_group(params["mirror_target"].id))
        # The checks of a probe share its one run (one message): one worker per probe.
        for name in PROBE_FIXTURES:
            if name in params:
                item.add_marker(pytest.mark.xdist_group(params[name].id))


def _keep_group_suffix(config: pytest.Config, items: list[pytest.Item]) -> None:
    """xdist tells its loadgroup scheduler an item's group through an ``@group`` suffix it
    writes into ``item._nodeid`` on each worker; since pytest 9.2 the node id lives in
    ``item._id`` (a structured NodeId) and that write is silently lost, so nothing is
    grouped (pytest-xdist issue 1386). Where the suffix is missing, set it the new way."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers only
        return
    for item in items:
        names = {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
        node_id = getattr(item, "_id", None)
        suffix = "@" + "_".join(sorted(names))
        if not names or node_id is None or item.nodeid.endswith(suffix):
            continue
        item._id = type(node_id).parse(f"{item.nodeid}{suffix}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Give each check's Allure result its runbook link and the target it verified
    (``pg:crm``). Here, at run time: the Check decorator runs at import, before
    ``--runbook-base-url`` is known. A hook rather than two autouse fixtures per check
    (the set-up of 1,200 DNS checks went from 0.37 to 0.11 s, profiled), and a check
    broken in its fixtures still links its runbook."""
    marker = item.get_closest_marker("check_id")
    runbook = marker.kwargs.get("runbook") if marker is not None else None
    params = _target_params(item)
    if runbook is None and not params:
        return
    import allure

    if runbook is not None:
        path = str(runbook)
        base = item.config.getoption("runbook_base_url")
        url = f"{base.rstrip('/')}/{path.lstrip('/')}" if base else path
        allure.dynamic.link(url, name=f"runbook: {path}")
    for name in TARGET_FIXTURES:
        if name in params:
            allure.dynamic.label("target", params[name].id)


@pytest.fixture(scope="session")
def inventory(pytestconfig: pytest.Config) -> Inventory:
    inv = pytestconfig.stash.get(INVENTORY, None)
    if inv is None:
        pytest.skip("no inventory (pass --inventory FILE)")
    return inv


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if _is_worker(config):
        return
    results = getattr(config.option, "allure_report_dir", None)
    if not results:
        return
    out = Path(results)
    out.mkdir(parents=True, exist_ok=True)
    _write_run_files(config, out)


def _write_run_files(config: pytest.Config, out: Path) -> None:
    """The run's Allure categories and environment (the controller's alone)."""
    shutil.copyfile(PACKAGE / "categories.json", out / "categories.json")
    (out / "environment.properties").write_text(_environment(config))


def _environment(config: pytest.Config) -> str:
    inv = config.stash.get(INVENTORY, None)
    stack = config.stash.get(STACK, None)
    props = {
        "opsdrill.version": __version__,
        "opsdrill.git_sha": _git_sha(),
        "run.started": config.stash[STARTED].isoformat(timespec="seconds"),
        "inventory.name": inv.name if inv else "none",
        "inventory.environment": inv.model.environment if inv else "none",
        # a probe is the target of its delivery and of its analysis checks: listed once
        "targets": ", ".join(dict.fromkeys(t.id for ts in _targets(inv).values() for t in ts))
        if inv
        else "",
    }
    if stack is not None:
        for key, value in stack.state.get("versions", {}).items():
            props[f"server.{key}"] = value
        props["local_stack.ready_seconds"] = str(stack.state.get("ready_seconds", ""))
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"
