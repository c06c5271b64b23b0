"""Reading an Allure result; one check on one target is ``CheckRun.by_check`` (conftest)."""

from __future__ import annotations

from typing import Any


def labels(res: dict[str, Any]) -> dict[str, str]:
    return {lab["name"]: lab["value"] for lab in res["labels"] if lab["name"] != "tag"}


def message(res: dict[str, Any]) -> str:
    return str(res.get("statusDetails", {}).get("message", ""))
