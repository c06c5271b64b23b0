"""A throwaway OpenPGP keypair for the local stack's backups and drills."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gnupg


@dataclass(frozen=True)
class Keypair:
    fingerprint: str
    public_file: Path
    secret_file: Path


def generate_keypair(outdir: Path, name: str, passphrase: str) -> Keypair:
    """Ed25519/Cv25519: generates in milliseconds, unlike RSA, and is what gpg now defaults to."""
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="opsdrill-gpg-") as home:
        gpg = gnupg.GPG(gnupghome=home)
        params = gpg.gen_key_input(
            key_type="EDDSA",
            key_curve="ed25519",
            key_usage="sign",
            subkey_type="ECDH",
            subkey_curve="cv25519",
            subkey_usage="encrypt",
            name_real=name,
            name_email=f"{name.replace(' ', '-').lower()}@opsdrill.invalid",
            expire_date=0,
            passphrase=passphrase,
        )
        key = gpg.gen_key(params)
        if not key.fingerprint:
            raise RuntimeError(f"gpg key generation failed: {key.stderr[-500:]}")
        public = outdir / f"{key.fingerprint}.pub.asc"
        secret = outdir / f"{key.fingerprint}.sec.asc"
        public.write_text(gpg.export_keys(key.fingerprint))
        armored = gpg.export_keys(key.fingerprint, secret=True, passphrase=passphrase)
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(armored)
        return Keypair(key.fingerprint, public, secret)
