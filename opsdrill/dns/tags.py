"""Tag=value lists, the record format shared by DKIM keys (RFC 6376 3.2) and DMARC
(RFC 7489 6.4): ``v=DKIM1; k=rsa; p=MIGf...``.

Small enough to write here; the libraries that have one (dkimpy, checkdmarc) raise on the
first problem or want their own DNS, and we must report every problem with our resolver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RE_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RE_TAG_VALUE = re.compile(r"^[\x21-\x3a\x3c-\x7e \t\r\n]*$")


@dataclass(frozen=True)
class TagList:
    """Tags in record order (names as written, or lowercased when asked) and the syntax
    problems found. A tag listed twice keeps its first value and is reported."""

    tags: dict[str, str]
    order: tuple[str, ...]
    errors: tuple[str, ...]

    def get(self, name: str) -> str | None:
        return self.tags.get(name)


def parse_tags(text: str, *, lower_names: bool = False) -> TagList:
    tags: dict[str, str] = {}
    order: list[str] = []
    errors: list[str] = []
    for raw in text.split(";"):
        spec = raw.strip()
        if not spec:
            continue  # an empty spec (trailing ';', or '; ;') carries nothing
        name, eq, value = spec.partition("=")
        name, value = name.strip(), value.strip()
        if not eq:
            errors.append(f"{spec!r} is not a tag=value pair")
            continue
        if not RE_TAG_NAME.match(name):
            errors.append(f"{spec!r}: invalid tag name {name!r}")
            continue
        if not RE_TAG_VALUE.match(value):
            errors.append(f"{spec!r}: invalid characters in the value of {name}=")
            continue
        if lower_names:
            name = name.lower()
        if name in tags:
            errors.append(f"tag {name}= appears more than once")
            continue
        tags[name] = value
        order.append(name)
    return TagList(tags, tuple(order), tuple(errors))
