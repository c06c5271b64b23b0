"""The local stack's mail world: who sends, who receives, where, and shared plumbing.

Real daemons from Debian, all on 127.0.0.1, each in its own module: Dovecot (``dovecot``:
IMAP, LMTP, sieve, SASL for Postfix), OpenDKIM (``opendkim``: signs with the keys
``demo_dns`` publishes), Postfix (``postfix``: submission with STARTTLS and AUTH, delivers
to Dovecot over LMTP), SpamAssassin (``spamd``: local rules only), Redis with a BullMQ
email queue (``redis_queue``) and the stand-in application (``demo_app``). Start order
Dovecot, OpenDKIM, Postfix (Postfix uses the other two's sockets); stop in reverse.

Mail flow: client --STARTTLS+AUTH--> Postfix submission --milter--> OpenDKIM (signs
From @example.test with ``sel1``, @portal.example.net with ``portal1``) --LMTP--> Dovecot
(global sieve: ``X-Spam-Flag: YES`` into Junk) --> Maildir --> IMAP (STARTTLS) / IMAPS.

This module holds what several of them share: the addresses and their secrets, the TLS
certificate every server presents, and the inventory sections describing all of it (the
lifecycle, socket directories and settings files are every daemon's: ``daemon``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from opsdrill_stack import demo_dns
from opsdrill_stack.daemon import write_private

# Postfix's name: the example.test MX, which demo_dns publishes (A 127.0.0.1), so its
# HELO resolves and SPF's "mx" mechanism authorises it.
MTA_HOSTNAME = demo_dns.MAIL_HOST
# The mailbox provider's host: Dovecot's hostname, and the authserv-id a receiving server
# of ours would write into Authentication-Results.
MAILBOX_HOSTNAME = "mail.mailbox.test"
AUTHSERV_ID = MAILBOX_HOSTNAME
MAILBOX_DOMAIN = "mailbox.test"
SENDER_DOMAIN = demo_dns.MAIN.name
# Domains Postfix delivers to Dovecot; anything else is refused (no relaying anywhere).
LOCAL_DOMAINS = (MAILBOX_DOMAIN, SENDER_DOMAIN)
# OpenDKIM signs mail From this domain with example.test's key (d=example.test): the
# "From domain not aligned with d=" fault needs no reconfiguration, just this From.
UNALIGNED_DOMAIN = "unaligned.test"
JUNK_FOLDER = "Junk"


@dataclass(frozen=True)
class MailUser:
    """A mailbox (and SASL login) of the local Dovecot; its password lives in secrets.env."""

    address: str
    password_env: str


PROBE = MailUser(f"probe@{MAILBOX_DOMAIN}", "OPSDRILL_IMAP_PASSWORD")
SENDER = MailUser(f"crm@{SENDER_DOMAIN}", "OPSDRILL_SMTP_PASSWORD")
# Where the demo app's EMAIL_REDIRECT_TO points when a test sets it (dev/test practice).
OPS = MailUser(f"ops@{SENDER_DOMAIN}", "OPSDRILL_OPS_IMAP_PASSWORD")
USERS = (PROBE, SENDER, OPS)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


def make_tls(directory: Path, days: int = 30) -> TlsFiles:
    """A self-signed certificate for every local server (SMTP, IMAP): names of both hosts,
    localhost and 127.0.0.1, so a client verifying against ``cert.pem`` (as a CA) accepts
    a connection to 127.0.0.1. The key is 0600 root: the daemons read it before dropping
    privileges."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MAILBOX_HOSTNAME)])
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(MAILBOX_HOSTNAME),
            x509.DNSName(MTA_HOSTNAME),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    write_private(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_private(
        files.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )
    return files


def inventory_tables(
    *,
    smtp_port: int,
    imaps_port: int,
    spamd_port: int,
    redis_port: int,
    app_port: int,
    ca_file: str,
    app_env_file: str,
) -> dict[str, Any]:
    """The inventory sections for the local mail world (probes, app environment, queue).

    Paths are relative to the inventory file, like the rest of the stack's inventory.
    """
    from opsdrill_stack.demo_app import INVITE_PATH, LINK_PATTERN, SUBJECT_PATTERN, TOKEN_ENV
    from opsdrill_stack.redis_queue import PASSWORD_ENV, PREFIX, QUEUE

    imap = {
        "host": "127.0.0.1",
        "port": imaps_port,
        "tls": "tls",
        "ca_file": ca_file,
        "user": PROBE.address,
        "password_env": PROBE.password_env,
        "folders": ["INBOX"],
        "junk_folders": [JUNK_FOLDER],
        "timeout_seconds": 10.0,
    }
    return {
        "probes": {
            "transactional": {
                "smtp": {
                    "host": "127.0.0.1",
                    "port": smtp_port,
                    "tls": "starttls",
                    "ca_file": ca_file,
                    "user": SENDER.address,
                    "password_env": SENDER.password_env,
                    "timeout_seconds": 10.0,
                },
                "from_address": SENDER.address,
                "to_address": PROBE.address,
                "imap": imap,
                "timeout_seconds": 30.0,
                "max_latency_seconds": 10.0,
                "trusted_authserv_ids": [AUTHSERV_ID],
                "spamd": {"host": "127.0.0.1", "port": spamd_port, "max_score": 5.0},
            },
            "portal-invite": {
                "trigger": {
                    "url": f"http://127.0.0.1:{app_port}{INVITE_PATH}",
                    "method": "POST",
                    # the run's token reaches the message as the invitee's name
                    "json": {"email": PROBE.address, "name": "Probe {token}"},
                    "bearer_token_env": TOKEN_ENV,
                    "timeout_seconds": 10.0,
                },
                "imap": imap,
                "expect": {
                    "to": PROBE.address,
                    "from_address": SENDER.address,
                    "subject_pattern": SUBJECT_PATTERN,
                    "link_pattern": LINK_PATTERN,
                    "fetch_link": True,
                    "window_seconds": 120.0,
                },
                "timeout_seconds": 30.0,
                "max_latency_seconds": 10.0,
                "trusted_authserv_ids": [AUTHSERV_ID],
                "spamd": {"host": "127.0.0.1", "port": spamd_port, "max_score": 5.0},
            },
        },
        "app_environment": {
            "crm": {"env_file": app_env_file, "forbidden_keys": ["EMAIL_REDIRECT_TO"]},
        },
        "queues": {
            QUEUE: {
                "redis": {
                    "host": "127.0.0.1",
                    "port": redis_port,
                    "password_env": PASSWORD_ENV,
                    "db": 0,
                    "timeout_seconds": 5.0,
                },
                "queue": QUEUE,
                "prefix": PREFIX,
                "max_waiting": 100,
                "max_oldest_age_seconds": 600.0,
            }
        },
    }
