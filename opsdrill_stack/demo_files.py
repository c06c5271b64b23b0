"""Demo bucket of uploaded files: what a CRM's MinIO holds, including the awkward cases.

Nested prefixes, unicode and space-bearing keys, an empty object and a multipart-sized
object (uploaded in 5 MiB parts, so its ETag is not an MD5) exercise every path of the
mirror. Content is deterministic so runs compare.
"""

from __future__ import annotations

import hashlib
import io

from minio import Minio

MULTIPART_BYTES = 12 * 1024 * 1024
MIN_PART = 5 * 1024 * 1024
AWKWARD_KEYS = [
    "clients/Zoë Nakamura/résumé 2024.pdf",
    "clients/東京 Office/契約書.pdf",
    "shared/meeting notes (final) v2.txt",
    "exports/empty-marker",
]


def _body(i: int, size: int) -> bytes:
    seed = hashlib.sha256(f"opsdrill-demo-{i}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def demo_objects(count: int = 300) -> dict[str, bytes]:
    objects: dict[str, bytes] = {}
    for i in range(count):
        folder = ("invoices", "attachments", "avatars", "imports")[i % 4]
        objects[f"{folder}/{2024 + i % 3}/{i % 12 + 1:02d}/file-{i:04d}.bin"] = _body(
            i, 200 + (i * 7919) % 60_000
        )
    for j, key in enumerate(AWKWARD_KEYS):
        objects[key] = b"" if key.endswith("empty-marker") else _body(10_000 + j, 4096)
    return objects


def create_demo_files(client: Minio, bucket: str, count: int = 300) -> int:
    """Fill ``bucket``; returns the number of objects written."""
    objects = demo_objects(count)
    for key, body in objects.items():
        client.put_object(bucket, key, io.BytesIO(body), len(body))
    big = _body(99_999, MULTIPART_BYTES)
    # length=-1 forces a multipart upload with MIN_PART parts: a multipart ETag.
    client.put_object(bucket, "archive/2023/all-scans.tar", io.BytesIO(big), -1, part_size=MIN_PART)
    return len(objects) + 1
