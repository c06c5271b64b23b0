"""A large object read once: spooled to the run's private directory while it is hashed.

The mirror records each copy's sha256 in the copy's metadata, which S3 takes with the
upload's first request, before any byte. An object larger than one part was therefore read
from the live store twice: once to hash it, once to send it. Spooled, the second read comes
from local disk, and the bytes sent are exactly the bytes hashed.

The spool is a 0600 file in the run's 0700 directory (opsdrill.workspace: removed when the
run ends, on signals too, and by the next run after a SIGKILL); each is removed as soon as
its object is done. A spool needs up to workers x the largest object of temporary space:
when the filesystem cannot take one (not enough free space at the start, or a write fails
with a full disk), that object goes the old way, read twice, and nothing fails for it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsdrill import workspace

_CHUNK = 1024 * 1024
# Free space a spool leaves to everything else on the filesystem (the spool of a restore,
# other programs): a spool that would go below it is not started.
RESERVE_BYTES = 1024**3
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class Spooled:
    path: Path
    size: int
    sha256: str
    content_type: str | None


class _DiskFull(Exception):
    pass


def room_for(size: int) -> bool:
    """Whether the run's directory has ``size`` bytes to spare, the reserve kept."""
    ws = workspace.current()
    if ws is None:
        return False
    try:
        return shutil.disk_usage(ws.path).free - size >= RESERVE_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def spool(response: Any, name: str) -> Iterator[Spooled | None]:
    """Write ``response``'s body to a private file while hashing it (check ``room_for``
    first); yields None when the disk filled up meanwhile (the caller then reads the object
    again). The response is closed here; the file is removed when the block ends, however
    it ends."""
    ws = workspace.current()
    path: Path | None = None
    try:
        if ws is None:
            yield None
            return
        path = ws.new_file(name)
        try:
            size, digest = _write(response, path)
        except _DiskFull:
            path.unlink(missing_ok=True)
            path = None
            yield None
            return
        yield Spooled(path, size, digest, response.headers.get("content-type"))
    finally:
        response.close()
        response.release_conn()
        if path is not None:
            path.unlink(missing_ok=True)


def _write(response: Any, path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in response.stream(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise _DiskFull from None
        raise
    return size, digest.hexdigest()
