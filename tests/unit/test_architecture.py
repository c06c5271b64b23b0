"""The import rules of README.md's ARCHITECTURE section, read from the source (an AST walk
over every import, function-level and ``TYPE_CHECKING`` ones included: a lazy import is
still a dependency).

- the library (``opsdrill``) never imports pytest, Allure, the plugin (``opsdrill_pytest``), the
  checks, the tests or the local stack (``opsdrill_stack``): the stack imports the
  library, never the reverse;
- plumbing never imports an area or the CLI; ``config`` imports only ``errors`` and
  ``redact``; areas import plumbing, ``config`` and only the areas listed in
  ``AREA_IMPORTS``; nothing but the CLI imports the CLI;
- no module of the library imports itself back through others (no import cycle).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Plumbing, in two layers: what needs no inventory, and what reaches a target through it.
CORE = frozenset(
    {"errors", "redact", "findings", "workspace", "progress", "metrics", "memory", "pipeline"}
)
TARGETS = frozenset({"pg", "pgtools", "s3", "gpg", "containers"})
CONFIG = "config"
AREAS = frozenset({"backups", "files", "secrets", "dns", "mail"})
CLI = frozenset({"cli", "__main__"})
# The only imports from one area into another: the secrets bundle is laid out and
# uploaded like a backup (the catalog's ids, create-only uploads); the mail probe reads
# DNS (the resolver for DKIM keys, the organisational domain for alignment).
AREA_IMPORTS = {"secrets": {"backups"}, "mail": {"dns"}}
# The root package (``__version__``) may be imported by anything.
PACKAGE = "opsdrill"
NEVER_IN_LIBRARY = frozenset(
    {
        "pytest",
        "_pytest",
        "xdist",
        "allure",
        "allure_commons",
        "opsdrill_pytest",
        "opsdrill_checks",
        "tests",
        "benchmarks",
        "opsdrill_stack",
    }
)
NEVER_IN_STACK = frozenset(
    {"pytest", "_pytest", "allure", "opsdrill_pytest", "opsdrill_checks", "tests"}
)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    line: int
    target: str  # the imported module (or the package, for a name that is no module)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(package: str) -> list[Import]:
    modules = _modules(package)
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [Import(name, node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against the importing package
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join([*here, base] if base else here)
                for alias in node.names:
                    dotted = f"{base}.{alias.name}"
                    found.append(Import(name, node.lineno, dotted if dotted in modules else base))
    return found


def _component(module: str) -> str:
    """``opsdrill.backups.drill`` -> ``backups``; ``opsdrill`` -> ``opsdrill``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _allowed(source: str, target: str) -> bool:
    if target in (source, PACKAGE):
        return True
    if source in CORE:
        return target in CORE
    if source == CONFIG:
        return target in ("errors", "redact")
    if source in TARGETS:
        return target in CORE or target in TARGETS or target == CONFIG
    if source in AREAS:
        return (
            target in CORE
            or target in TARGETS
            or target == CONFIG
            or target in AREA_IMPORTS.get(source, set())
        )
    if source in CLI:
        return True
    raise AssertionError(
        f"opsdrill.{source} is in no layer: add it to tests/unit/test_architecture.py"
    )


def _where(imp: Import) -> str:
    return f"{imp.source} (line {imp.line}) imports {imp.target}"


def test_the_library_imports_no_test_tool_plugin_check_or_stack() -> None:
    bad = [
        _where(imp) for imp in _imports("opsdrill") if imp.target.split(".")[0] in NEVER_IN_LIBRARY
    ]
    assert bad == [], "the library must stay free of these (README: ARCHITECTURE)"


def test_layers_import_only_downwards() -> None:
    bad = [
        f"{_where(imp)}: {_component(imp.source)} may not import {_component(imp.target)}"
        for imp in _imports("opsdrill")
        if imp.target.split(".")[0] == PACKAGE
        and not _allowed(_component(imp.source), _component(imp.target))
    ]
    assert bad == [], "see README.md, ARCHITECTURE: which layer may import which"


def test_every_library_module_has_a_layer() -> None:
    components = {_component(name) for name in _modules("opsdrill")}
    assert components - {PACKAGE} <= CORE | TARGETS | AREAS | CLI | {CONFIG}


def test_no_import_cycle_in_the_library() -> None:
    modules = set(_modules("opsdrill"))
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in _imports("opsdrill"):
        if imp.target in modules and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    cycles = _cycles(graph)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_stack_uses_the_library_and_no_test_layer() -> None:
    bad = [
        _where(imp)
        for imp in _imports("opsdrill_stack")
        if imp.target.split(".")[0] in NEVER_IN_STACK
    ]
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [
        ("backups", "config", True),
        ("config", "pg", False),  # the inventory never reaches for a target
        ("pg", "backups", False),  # plumbing never imports an area
        ("mail", "dns", True),
        ("dns", "mail", False),
        ("files", "secrets", False),
        ("backups", "cli", False),
        ("cli", "backups", True),
    ],
)
def test_the_rules_themselves(source: str, target: str, allowed: bool) -> None:
    assert _allowed(source, target) is allowed


def test_the_stack_plugs_its_command_in_and_its_absence_is_explained(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`opsdrill stack` comes from the stack's entry point (the library names no stack
    module); where the stack is not installed (opsdrill's wheel), the CLI says what it is
    and exits 2, as for any configuration error."""
    import importlib.metadata

    import opsdrill.cli as cli

    found = importlib.metadata.entry_points(group=cli.COMMANDS_GROUP)
    commands = {e.name: e.value for e in found}
    assert commands == {"stack": "opsdrill_stack.cli:register"}  # make setup installed it
    assert "stack" in cli._commands(cli.build_parser())
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert "stack" not in cli._commands(cli.build_parser())
    assert cli.main(["stack", "up", "--dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opsdrill: error: stack: the local stack is the opsdrill repository's")
    assert "make setup" in err


def test_a_built_in_command_does_not_search_for_plugged_in_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading every installed distribution's metadata costs each cron run ~25 ms: only
    help and a command that is not built in pay for it."""
    import importlib.metadata

    import opsdrill.cli as cli

    def searched(group: str) -> list[object]:
        raise AssertionError(f"entry points of {group} searched")

    monkeypatch.setattr(importlib.metadata, "entry_points", searched)
    assert cli.main(["inventory", "check", "/nonexistent/inventory.toml"]) == 2
    assert "/nonexistent/inventory.toml" in capsys.readouterr().err
