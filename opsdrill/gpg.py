"""OpenPGP through GnuPG: keyrings, streaming encrypt/decrypt commands, packet inspection.

Key handling goes through python-gnupg. The data path runs ``gpg`` as a pipeline stage
directly (see pipeline.py): python-gnupg copies data through Python threads into a file or
memory, which cannot chain process-to-process the way a streamed multi-GB backup must.
Every run uses a throwaway GNUPGHOME holding only the keys the inventory names, so an
operator's own keyring never changes what a backup is encrypted to.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import gnupg

from opsdrill import workspace
from opsdrill.config.inventory import Inventory
from opsdrill.errors import ConfigError, CredentialsRejected

_PKESK = re.compile(r":pubkey enc packet: version \d+, algo \d+, keyid ([0-9A-F]{16})")
GPG = "gpg"


class GpgHome:
    """A private GNUPGHOME for one run, in the run's private directory (workspace.py); its
    agent, which caches the drill key's passphrase, is stopped and the home removed on
    every way out, and by the next run if this one is killed."""

    def __init__(self) -> None:
        self._run = contextlib.ExitStack()
        ws = workspace.current() or self._run.enter_context(workspace.run("gpg", share=False))
        self._workspace = ws
        try:
            self.path = ws.gnupg_home()
        except BaseException:
            self._run.close()
            raise
        try:
            self.gpg = gnupg.GPG(gnupghome=str(self.path))
        except OSError:
            self.close()
            raise ConfigError("gpg not found (fix: apt-get install gnupg)") from None

    def __enter__(self) -> GpgHome:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._workspace.release_gnupg_home(self.path)
        finally:
            self._run.close()

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

    def check_decrypts(self, inv: Inventory, recipients: list[str]) -> None:
        """Prove the drill key decrypts what backups are encrypted to (round trip).

        A wrong passphrase is ``CredentialsRejected`` (see ``import_drill_key``); a key that
        is none of the recipients is a ``ConfigError``.
        """
        secret_key, drill, passphrase = import_drill_key(self, inv)
        probe = "opsdrill key check"
        enc = self.gpg.encrypt(probe, recipients, always_trust=True, armor=False)
        if not enc.ok:
            raise ConfigError(f"gpg: cannot encrypt to the recipients: {enc.status}")
        dec = self.gpg.decrypt(enc.data, passphrase=passphrase)
        if str(dec) != probe:
            raise ConfigError(
                f"gpg.drill_private_key_file {secret_key}: cannot decrypt backups encrypted to "
                f"{', '.join(recipients)}: the drill key {', '.join(drill)} is none of them "
                "(fix: point gpg.drill_private_key_file at a recipient's private key, or add "
                "the drill key to gpg.recipients)"
            )

    def unlock_error(self, fingerprints: list[str], passphrase: str) -> str | None:
        """None if ``passphrase`` unlocks these secret keys (a probe encrypted to them here
        decrypts), else gpg's reason. Run it before any other decryption in this home:
        gpg-agent caches a passphrase that worked, and gpg reports a wrong one as "No
        secret key", exactly like a message encrypted to someone else."""
        enc = self.gpg.encrypt(
            "opsdrill passphrase check", fingerprints, always_trust=True, armor=False
        )
        if not enc.ok:
            raise ConfigError(
                f"gpg.drill_private_key_file: cannot encrypt to the drill key itself "
                f"({enc.status or 'no encryption subkey'}): is it an encryption key?"
            )
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, passphrase.encode() + b"\n")  # far below the pipe buffer size
            os.close(write_fd)
            proc = subprocess.run(
                self.decrypt_argv(read_fd),
                input=enc.data,
                capture_output=True,
                timeout=60,
                pass_fds=(read_fd,),
                check=False,
            )
        finally:
            os.close(read_fd)
        if proc.returncode == 0 and proc.stdout == b"opsdrill passphrase check":
            return None
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].removeprefix("gpg: ")[:200] if lines else f"gpg exited {proc.returncode}"

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


def import_drill_key(home: GpgHome, inv: Inventory) -> tuple[Path, list[str], str]:
    """Import ``gpg.drill_private_key_file`` and prove its passphrase unlocks it.

    Returns (the key file, its secret key fingerprints, the passphrase). Done before
    anything is downloaded, so that a drill with a wrong passphrase fails at once, and so
    that a later decryption failure can only mean the data was not encrypted to this key.
    A wrong or missing passphrase is ``CredentialsRejected`` naming
    ``gpg.drill_passphrase_env`` and its variable: opsdrill's own credential, not a fault of
    any backup.
    """
    gpg = inv.model.gpg
    if gpg is None or not gpg.drill_private_key_file:
        raise ConfigError(
            f"{inv.path}: gpg.drill_private_key_file: missing; encrypted data cannot be "
            "decrypted without it (fix: point it at the armored private key)"
        )
    key_file = inv.resolve_path(gpg.drill_private_key_file)
    home.import_keys(key_file, what="gpg.drill_private_key_file")
    secret = sorted({str(k["fingerprint"]) for k in home.gpg.list_keys(True)})
    if not secret:
        raise ConfigError(
            f"gpg.drill_private_key_file {key_file}: holds no private key, only a public "
            "one (fix: export it with gpg --export-secret-keys --armor)"
        )
    var = gpg.drill_passphrase_env
    passphrase = inv.secret(var) if var else ""
    reason = home.unlock_error(secret, passphrase)
    if reason is None:
        return key_file, secret, passphrase
    where = f"the drill key {', '.join(secret)} in gpg.drill_private_key_file {key_file}"
    if not any(w in reason.lower() for w in ("secret key", "passphrase", "decryption failed")):
        raise ConfigError(f"gpg could not use {where}: {reason}")  # e.g. no gpg-agent
    setting = (
        inv.secret_setting("gpg.drill_passphrase_env", var)
        if var
        else "gpg.drill_passphrase_env (not set: no passphrase was given)"
    )
    raise CredentialsRejected(
        f"{where} did not accept opsdrill's passphrase (gpg: {reason}; fix: check {setting})"
    )


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
