"""What a check fails with: a finding, computed by the library.

A finding names a problem a user must act on: a stable ``code`` that checks select on
(``spf.softfail``, ``backup.encryption.recipients``) and a ``message`` for people, naming
where, what was expected and what was found. The library computes findings; a check only
selects the codes it covers and fails with their messages (``opsdrill_pytest.dns.fail_with``),
so what is judged can be unit-tested without pytest, Allure or a target.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    code: str
    message: str

    def evidence(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def select(findings: list[Finding], codes: tuple[str, ...] | frozenset[str]) -> list[Finding]:
    """The findings with one of ``codes``, in order."""
    return [f for f in findings if f.code in codes]
