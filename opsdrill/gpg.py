"""OpenPGP through GnuPG: keyrings, streaming encrypt/decrypt commands, packet inspection.

Key handling goes through python-gnupg. The data path runs ``gpg`` as a pipeline stage
directly (see pipeline.py): python-gnupg copies data through Python threads into a file or
memory, which cannot chain process-to-process the way a streamed multi-GB backup must.
Every run uses a throwaway GNUPGHOME holding only the keys the inventory names, so an
operator's own keyring never changes what a backup is encrypted to.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import gnupg

from opsdrill.errors import ConfigError

_PKESK = re.compile(r":pubkey enc packet: version \d+, algo \d+, keyid ([0-9A-F]{16})")
GPG = "gpg"


class GpgHome:
    """A private GNUPGHOME for one run; its agent is stopped and the dir removed on exit."""

    def __init__(self) -> None:
        # Short path: gpg-agent's socket path must stay under ~107 bytes.
        self.path = Path(tempfile.mkdtemp(prefix="odg-", dir="/tmp"))
        try:
            self.gpg = gnupg.GPG(gnupghome=str(self.path))
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)
            raise ConfigError("gpg not found (fix: apt-get install gnupg)") from None

    def __enter__(self) -> GpgHome:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(
            ["gpgconf", "--homedir", str(self.path), "--kill", "all"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        shutil.rmtree(self.path, ignore_errors=True)

    def base_argv(self) -> list[str]:
        return [GPG, "--homedir", str(self.path), "--batch", "--no-tty", "--quiet"]

    def import_keys(self, path: Path, *, what: str) -> list[str]:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from None
        result = self.gpg.import_keys(text)
        if not result.fingerprints:
            raise ConfigError(f"{what} {path}: no OpenPGP key found in it")
        return [str(f) for f in result.fingerprints]

    def encryption_key_ids(self, fingerprints: list[str]) -> dict[str, list[str]]:
        """Recipient fingerprint -> key ids that appear in the packets it can decrypt."""
        keys = {k["fingerprint"]: k for k in self.gpg.list_keys()}
        out: dict[str, list[str]] = {}
        for fpr in fingerprints:
            key = keys.get(fpr)
            if key is None:
                raise ConfigError(
                    f"gpg recipient {fpr} is not in gpg.public_keys_file (fix: export that "
                    "public key into the file)"
                )
            ids = [sub[0] for sub in key.get("subkeys", []) if "e" in sub[1]]
            # lowercase "e" in cap: the primary key itself encrypts (uppercase = any subkey)
            if "e" in key.get("cap", "") or not ids:
                ids.append(str(key["keyid"]))
            out[fpr] = ids
        return out

    def check_decrypts(self, secret_key: Path, passphrase: str, recipients: list[str]) -> None:
        """Prove the drill key decrypts what backups are encrypted to (round trip)."""
        self.import_keys(secret_key, what="gpg.drill_private_key_file")
        probe = "opsdrill key check"
        enc = self.gpg.encrypt(probe, recipients, always_trust=True, armor=False)
        if not enc.ok:
            raise ConfigError(f"gpg: cannot encrypt to the recipients: {enc.status}")
        dec = self.gpg.decrypt(enc.data, passphrase=passphrase)
        if str(dec) != probe:
            raise ConfigError(
                f"gpg.drill_private_key_file {secret_key}: cannot decrypt backups encrypted to "
                f"{', '.join(recipients)} ({dec.status or 'no usable secret key'}; check "
                "the passphrase variable and that the key belongs to a recipient)"
            )

    def encrypt_argv(self, recipients: list[str]) -> list[str]:
        argv = [*self.base_argv(), "--trust-model", "always", "--compress-algo", "none"]
        for fpr in recipients:
            argv += ["--recipient", fpr]
        return [*argv, "--encrypt", "--output", "-"]

    def decrypt_argv(self, passphrase_fd: int | None) -> list[str]:
        argv = [*self.base_argv(), "--pinentry-mode", "loopback"]
        if passphrase_fd is not None:
            argv += ["--passphrase-fd", str(passphrase_fd)]
        return [*argv, "--decrypt", "--output", "-"]


@dataclass(frozen=True)
class PacketInfo:
    format: str  # openpgp | zstd | gzip | pgdump | plaintext
    recipient_key_ids: list[str]
    encrypted_data: bool


MAGIC = {
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x1f\x8b": "gzip",
    b"PGDMP": "pgdump",
}


def sniff(head: bytes) -> str:
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    # An OpenPGP packet header has bit 7 set; PKESK is tag 1 (old 0x84-0x87, new 0xC1).
    if head[:1] and (head[0] & 0x80) and (head[0] in (0x84, 0x85, 0x86, 0x87, 0xC1)):
        return "openpgp"
    return "plaintext"


def inspect(head: bytes, home: GpgHome) -> PacketInfo:
    """List the packets at the start of an object (no secret key needed)."""
    kind = sniff(head)
    if kind != "openpgp":
        return PacketInfo(kind, [], False)
    proc = subprocess.run(
        [*home.base_argv(), "--list-packets"],
        input=head,
        capture_output=True,
        timeout=30,
        check=False,
    )
    text = proc.stdout.decode(errors="replace")
    ids = _PKESK.findall(text)
    return PacketInfo("openpgp", ids, ":encrypted data packet:" in text)
