"""A mirror's two stores as the checks read and write them: live and off-site objects by
key relative to each prefix, the sha256 of their bytes, canaries under the mirror's
reserved prefix. Keys are read exactly as listed, "." and ".." segments included
(``s3_exact``), as the mirror copies them. A store's transport and S3 errors mean "could
not look" (``TargetUnreachable``: broken), never a verdict.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any, TypeVar

from opsdrill.config.inventory import Inventory, Mirror, Store
from opsdrill.files.copying import INDEX_PREFIX, MirrorSummary, normalise_prefix, object_sha256
from opsdrill.files.mirror import run_mirror
from opsdrill.files.s3_exact import exact_client
from opsdrill.s3 import S3_ERRORS, store_call, unreachable

T = TypeVar("T")
# A key the off-site store answers this for is not there: it cannot hold that name (MinIO
# refuses "." and ".." segments), so parity fails naming it, as the mirror's errors do.
NOT_THERE = frozenset(
    {"NoSuchKey", "NotFound", "ResourceNotFound", "XMinioInvalidObjectName", "InvalidObjectName"}
)


def _norm(prefix: str) -> str:
    return normalise_prefix(prefix)


class MirrorStores:
    """``[mirrors.NAME]``'s source (live) and target (off-site) stores."""

    def __init__(self, inv: Inventory, name: str) -> None:
        self.inv = inv
        self.name = name
        self.cfg: Mirror = inv.mirror(name)
        self.source: Store = inv.store(self.cfg.source)
        self.target: Store = inv.store(self.cfg.target)

    # Clients that read keys with "." and ".." segments exactly, as the mirror copies them.
    @cached_property
    def src(self) -> Any:
        return exact_client(self.inv, self.source)

    @cached_property
    def dst(self) -> Any:
        return exact_client(self.inv, self.target)

    def call(self, store_name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A request to one of the mirror's stores: its transport and S3 errors mean
        "could not look" (broken); anything else passes unchanged."""
        return store_call(store_name, self.inv.store(store_name), fn, *args, **kw)

    def live_objects(self) -> dict[str, Any]:
        """Live objects by key relative to the source prefix (canaries excluded)."""
        prefix = _norm(self.source.prefix)
        objects = self.call(
            self.cfg.source,
            lambda: list(self.src.list_objects(self.source.bucket, prefix=prefix, recursive=True)),
        )
        out = {}
        for obj in objects:
            rel = obj.object_name[len(prefix) :]
            if not rel.startswith(self.cfg.canary_prefix):
                out[rel] = obj
        return out

    def target_key(self, rel: str) -> str:
        return _norm(self.target.prefix) + rel

    def source_key(self, rel: str) -> str:
        return _norm(self.source.prefix) + rel

    def target_objects(self) -> dict[str, Any]:
        prefix = _norm(self.target.prefix)
        objects = self.call(
            self.cfg.target,
            lambda: list(self.dst.list_objects(self.target.bucket, prefix=prefix, recursive=True)),
        )
        return {
            o.object_name[len(prefix) :]: o
            for o in objects
            if not o.object_name[len(prefix) :].startswith(INDEX_PREFIX)
        }

    def live_sha(self, rel: str) -> str:
        return self.call(
            self.cfg.source, object_sha256, self.src, self.source.bucket, self.source_key(rel)
        )

    def target_sha(self, rel: str) -> str | None:
        """sha256 of the off-site copy's bytes (None: no copy). The bytes, not the sha256
        the mirror recorded in the metadata: that is only as honest as the mirror."""
        key = self.target_key(rel)
        try:
            return object_sha256(self.dst, self.target.bucket, key)
        except S3_ERRORS as exc:
            if getattr(exc, "code", "") in NOT_THERE:
                return None
            raise unreachable(self.cfg.target, self.target, exc) from None

    def parallel(self, fn: Callable[[str], T], keys: list[str]) -> Iterator[tuple[str, T]]:
        with ThreadPoolExecutor(max(2, self.cfg.workers)) as pool:
            yield from zip(keys, pool.map(fn, keys), strict=True)

    def run(self) -> MirrorSummary:
        return self.call(self.cfg.target, run_mirror, self.inv, self.name)

    def canary_key(self, kind: str) -> str:
        return f"{self.cfg.canary_prefix}{kind}-{uuid.uuid4().hex[:12]}"

    def put_live(self, rel: str, body: bytes) -> None:
        self.call(
            self.cfg.source,
            self.src.put_object,
            self.source.bucket,
            self.source_key(rel),
            io.BytesIO(body),
            len(body),
        )

    def remove_live(self, rel: str) -> None:
        self.call(self.cfg.source, self.src.remove_object, self.source.bucket, self.source_key(rel))

    def target_versions(self, rel: str) -> list[Any]:
        key = self.target_key(rel)
        return [
            v
            for v in self.call(
                self.cfg.target,
                lambda: list(
                    self.dst.list_objects(self.target.bucket, prefix=key, include_version=True)
                ),
            )
            if v.object_name == key
        ]

    def purge_target(self, rel: str) -> None:
        """Remove every version of a canary off-site: the check cleans up after itself."""
        for version in self.target_versions(rel):
            self.call(
                self.cfg.target,
                self.dst.remove_object,
                self.target.bucket,
                version.object_name,
                version_id=version.version_id,
            )

    def versioning(self) -> str:
        cfg = self.call(self.cfg.target, self.dst.get_bucket_versioning, self.target.bucket)
        return str(cfg.status)
