"""A stand-in for the CRM application: the portal invite that sends mail, end to end.

``POST /api/portal/invite`` (``Authorization: Bearer <PORTAL_API_TOKEN>``, JSON body
``{"email": "...", "name": "..."}``, the name optional) sends an invitation through the
local Postfix submission port (``SMTP_URL``: STARTTLS, then AUTH as its user with
``SMTP_PASSWORD``; From ``SMTP_FROM``) to ``"name" <email>``, greeting the invitee by
name, whose body holds an activation link ``http://127.0.0.1:PORT/activate?token=<random>``,
and answers 201. The name is how a triggered probe's per-run token reaches the message,
as it would with a real application (the probe invites "Probe <token>").
``GET /activate?token=...`` answers 200 for a token it issued and 404 otherwise.
``GET /health`` answers 200.

Like the real application it takes its settings from its environment, the ``.env`` the
stack writes (``DIR/app/.env``), re-read at each request so that a test editing it needs no
restart. ``EMAIL_REDIRECT_TO`` behaves as the runbook describes: every email goes to that
address instead, the original recipient prefixed to the subject. Deployment facts (its
port, public URL, the CA it trusts) are in ``demo_app.json``, not in the .env: the secrets
bundle registers every .env value for redaction, and a bare ``127.0.0.1`` or port number
registered there would be masked in every message of the process.

Test switches (``DemoApp``): ``set_redirect``/``clear_redirect`` edit ``EMAIL_REDIRECT_TO``
in the .env; ``omit_activation_link``/``include_activation_link`` make the invitation go
out without its link; ``failing_invites(status)`` makes the invite endpoint answer
``status`` (500: an application error) without sending; ``dropping_invites`` makes it
answer 201 and send nothing (a queue worker that loses the job); ``holding_invites``
makes it answer 201 and keep the invitation until the switch is off again (a queue whose
worker is stopped, then restarted): tests use it to make several runs' invitations
arrive when they choose. The switches live in ``controls.json`` beside the .env, read per
request.

Run as ``python -m opsdrill_stack.demo_app CONFIG.json``; nothing it logs holds a secret.
"""

from __future__ import annotations

import contextlib
import hmac
import html
import json
import os
import secrets
import smtplib
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from opsdrill.config.envfile import read_env_file
from opsdrill_stack.daemon import Daemon, write_private
from opsdrill_stack.mail import SENDER
from opsdrill_stack.procs import free_port

INVITE_PATH = "/api/portal/invite"
ACTIVATE_PATH = "/activate"
INVITE_SUBJECT = "You're invited to the Example CRM portal"
SUBJECT_PATTERN = "invited"
LINK_PATTERN = r"https?://\S+/activate\?token=[A-Za-z0-9_-]+"
TOKEN_ENV = "OPSDRILL_APP_TOKEN"  # the stack's secrets.env name for PORTAL_API_TOKEN
APP_NAME = "Example CRM"
CONTROLS_FILE = "controls.json"
SMTP_TIMEOUT = 15.0


def app_env_lines(*, smtp_port: int, smtp_password: str, api_token: str) -> str:
    """The .env lines the application needs to send mail through the local Postfix.

    Whole values only (a URL, a display address): every value is registered as a secret
    by whoever reads the .env, and must not mask ordinary text such as an IP address."""
    user = quote(SENDER.address, safe="")
    return (
        f"SMTP_URL=smtp://{user}@127.0.0.1:{smtp_port}/?tls=starttls\n"
        f"SMTP_PASSWORD={smtp_password}\n"
        f'SMTP_FROM="{APP_NAME} <{SENDER.address}>"\n'
        f"PORTAL_API_TOKEN={api_token}\n"
    )


def _read_env(path: Path) -> dict[str, str]:
    return read_env_file(path)


def invitation(
    env: dict[str, str], to: str, link: str | None, invitee: str | None = None
) -> EmailMessage:
    """The portal invitation as the application renders it (and EMAIL_REDIRECT_TO bends)."""
    redirect = env.get("EMAIL_REDIRECT_TO", "").strip()
    name, sender = parseaddr(env["SMTP_FROM"])
    msg = EmailMessage()
    msg["From"] = formataddr((name or APP_NAME, sender))
    msg["To"] = redirect or formataddr((invitee or "", to))
    msg["Subject"] = f"[{to}] {INVITE_SUBJECT}" if redirect else INVITE_SUBJECT
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid("portal-invite", domain=sender.rpartition("@")[2])
    action = (
        f"To activate your account, open this link:\n\n{link}\n\n"
        if link
        else "Your account is ready for activation.\n\n"
    )
    hello = f"Hello {invitee}," if invitee else "Hello,"
    msg.set_content(
        f"{hello}\n\nyou have been invited to the {APP_NAME} client portal.\n\n{action}"
        f"The link is valid for 7 days. If you did not expect this invitation, you can "
        f"ignore this email.\n\nThe {APP_NAME} team\n",
        cte="7bit",  # the link stays verbatim in the raw message; the HTML part is QP
    )
    html_action = f'<p><a href="{link}">Activate your account</a></p>' if link else ""
    msg.add_alternative(
        f"<html><body><p>{html.escape(hello)}</p><p>you have been invited to the {APP_NAME} client "
        f"portal.</p>{html_action}<p>The link is valid for 7 days. If you did not expect this "
        f"invitation, you can ignore this email.</p><p>The {APP_NAME} team</p></body></html>",
        subtype="html",
    )
    return msg


def send(env: dict[str, str], msg: EmailMessage, ca_file: str | None) -> None:
    url = urlsplit(env["SMTP_URL"])
    context = ssl.create_default_context(cafile=ca_file)
    with smtplib.SMTP(url.hostname or "", url.port or 587, timeout=SMTP_TIMEOUT) as smtp:
        if parse_qs(url.query).get("tls", ["starttls"])[0] == "starttls":
            smtp.starttls(context=context)
        if url.username:
            smtp.login(unquote(url.username), env["SMTP_PASSWORD"])
        smtp.send_message(msg)


class _App:
    def __init__(self, env_file: Path, public_url: str, ca_file: str | None) -> None:
        self.env_file = env_file
        self.public_url = public_url
        self.ca_file = ca_file
        self.tokens: set[str] = set()
        self.lock = threading.Lock()
        self.held: list[EmailMessage] = []  # invitations kept while hold_invites is on

    def release_held(self) -> None:
        """The "worker" of held invitations: sends them once the switch is off."""
        while True:
            time.sleep(0.1)
            with self.lock:
                if not self.held or self.controls().get("hold_invites"):
                    continue
                batch, self.held = self.held, []
            env = _read_env(self.env_file)
            for msg in batch:
                try:
                    send(env, msg, self.ca_file)
                except (OSError, smtplib.SMTPException) as exc:
                    sys.stderr.write(f"held invitation not sent: {type(exc).__name__}\n")

    def controls(self) -> dict[str, Any]:
        path = self.env_file.parent / CONTROLS_FILE
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}

    def invite(self, authorization: str, body: bytes) -> tuple[int, dict[str, Any]]:
        env = _read_env(self.env_file)
        given = authorization.removeprefix("Bearer ").strip()
        if not authorization.startswith("Bearer ") or not hmac.compare_digest(
            given.encode(), env.get("PORTAL_API_TOKEN", "").encode()
        ):
            return 401, {"error": "unauthorized"}
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            return 400, {"error": "body is not JSON"}
        email = payload.get("email") if isinstance(payload, dict) else None
        if not isinstance(email, str) or "@" not in email or any(c in email for c in "\r\n "):
            return 400, {"error": "email: an address is required"}
        name = payload.get("name") if isinstance(payload, dict) else None
        if name is not None and (not isinstance(name, str) or any(c in name for c in "\r\n")):
            return 400, {"error": "name: one line of text"}
        controls = self.controls()
        failing = controls.get("fail_invites_with")
        if isinstance(failing, int) and failing:
            return failing, {"error": "internal error: the invitation was not sent"}
        if controls.get("drop_invites"):  # a worker that loses the job: 201, nothing sent
            return 201, {"status": "invited", "email": email}
        token = secrets.token_urlsafe(24)
        link = f"{self.public_url}{ACTIVATE_PATH}?token={token}"
        omit = bool(controls.get("omit_activation_link"))
        msg = invitation(env, email, None if omit else link, name)
        with self.lock:
            if controls.get("hold_invites"):  # the worker is stopped: queued, not sent
                self.held.append(msg)
                self.tokens.add(token)
                return 201, {"status": "invited", "email": email}
        try:
            send(env, msg, self.ca_file)
        except (OSError, smtplib.SMTPException) as exc:
            return 502, {"error": f"sending failed: {type(exc).__name__}: {exc}"}
        with self.lock:
            self.tokens.add(token)
        return 201, {"status": "invited", "email": email}

    def activate(self, query: str) -> tuple[int, dict[str, Any]]:
        token = parse_qs(query).get("token", [""])[0]
        with self.lock:
            known = token in self.tokens
        return (200, {"status": "activated"}) if known else (404, {"error": "unknown token"})


def _handler(app: _App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "ExampleCRM/1.0"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/health":
                self._reply(200, {"status": "ok"})
            elif url.path == ACTIVATE_PATH:
                self._reply(*app.activate(url.query))
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            if urlsplit(self.path).path != INVITE_PATH:
                self._reply(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, 65536))
            self._reply(*app.invite(self.headers.get("Authorization", ""), body))

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            # Path only: the query string may carry an activation token.
            sys.stderr.write(f"{self.command} {urlsplit(self.path).path} {args[1:2]}\n")

    return Handler


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(args[0]).read_text())
    app = _App(Path(config["env_file"]), config["public_url"], config.get("ca_file"))
    server = ThreadingHTTPServer(("127.0.0.1", int(config["port"])), _handler(app))
    server.daemon_threads = True
    threading.Thread(target=app.release_held, daemon=True).start()
    server.serve_forever()
    return 0


@dataclass
class DemoApp(Daemon):
    label: ClassVar[str] = "demo app"
    log_name: ClassVar[str] = "demo_app.log"
    conf_name: ClassVar[str] = "demo_app.json"

    @property
    def env_file(self) -> Path:
        return self.base / ".env"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -----------------------------------------------------------------
    def start(self, ca_file: Path | None = None) -> None:
        """Serve the app, reading its settings from ``base/.env`` (written beforehand);
        ``ca_file``: the CA it trusts for SMTP (the stack's self-signed certificate)."""
        if not self.env_file.exists():
            raise RuntimeError(f"{self.env_file}: the application's .env is missing")
        self.port = free_port()
        self.conf.write_text(
            json.dumps(
                {
                    "port": self.port,
                    "public_url": self.url,
                    "env_file": str(self.env_file.resolve()),
                    "ca_file": str(ca_file.resolve()) if ca_file else None,
                }
            )
        )
        self.run_until_ready(
            [sys.executable, "-m", "opsdrill_stack.demo_app", str(self.conf.resolve())],
            self._healthy,
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    # -- runtime switches (tests) ----------------------------------------------------
    def set_redirect(self, address: str, shape: RedirectShape = "plain") -> None:
        """Set EMAIL_REDIRECT_TO in the app's .env (as a forgotten dev setting would be),
        written as ``shape``: ``plain`` (appended ``KEY=value``), ``export-tab``
        (``export<TAB>KEY=value``) or ``bom`` (the first line, after a UTF-8 byte-order
        mark, as an editor on Windows saves it). The application's dotenv applies all
        three."""
        self._edit_env("EMAIL_REDIRECT_TO", address, shape)

    def clear_redirect(self) -> None:
        self._edit_env("EMAIL_REDIRECT_TO", None)

    @contextlib.contextmanager
    def redirecting(self, address: str, shape: RedirectShape = "plain") -> Iterator[None]:
        self.set_redirect(address, shape)
        try:
            yield
        finally:
            self.clear_redirect()

    def omit_activation_link(self) -> None:
        self._set_control("omit_activation_link", True)

    def include_activation_link(self) -> None:
        self._set_control("omit_activation_link", False)

    @contextlib.contextmanager
    def without_activation_link(self) -> Iterator[None]:
        self.omit_activation_link()
        try:
            yield
        finally:
            self.include_activation_link()

    @contextlib.contextmanager
    def failing_invites(self, status: int = 500) -> Iterator[None]:
        """Inside, the invite endpoint answers ``status`` (after checking the token) and
        sends nothing."""
        self._set_control("fail_invites_with", status)
        try:
            yield
        finally:
            self._set_control("fail_invites_with", None)

    @contextlib.contextmanager
    def dropping_invites(self) -> Iterator[None]:
        """Inside, the invite endpoint answers 201 as usual but sends nothing."""
        self._set_control("drop_invites", True)
        try:
            yield
        finally:
            self._set_control("drop_invites", False)

    @contextlib.contextmanager
    def holding_invites(self) -> Iterator[None]:
        """Inside, the invite endpoint answers 201 and keeps the invitation; they are all
        sent (within about 0.1 s) once the block ends, or at ``release_invites``."""
        self._set_control("hold_invites", True)
        try:
            yield
        finally:
            self.release_invites()

    def release_invites(self) -> None:
        self._set_control("hold_invites", False)

    def invites_received(self) -> int:
        """How many invite requests the application logged (every answer counts)."""
        if not self.logfile.exists():
            return 0
        return self.logfile.read_text(errors="replace").count(f"POST {INVITE_PATH} ")

    def _set_control(self, key: str, value: Any) -> None:
        path = self.base / CONTROLS_FILE
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = value
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def _edit_env(self, key: str, value: str | None, shape: RedirectShape = "plain") -> None:
        """Replace (or drop, for None) ``key`` in the .env, keeping every other line; the
        file is replaced atomically and stays 0600."""
        text = self.env_file.read_text().removeprefix(BOM)
        lines = [line for line in text.splitlines() if _key_of(line) != key]
        if value is not None and shape == "bom":
            lines.insert(0, f"{BOM}{key}={value}")
        elif value is not None:
            lines.append(f"export\t{key}={value}" if shape == "export-tab" else f"{key}={value}")
        tmp = self.env_file.with_name(".env.tmp")
        write_private(tmp, "\n".join(lines) + "\n")
        os.replace(tmp, self.env_file)


BOM = "\ufeff"
RedirectShape = Literal["plain", "export-tab", "bom"]


def _key_of(line: str) -> str:
    """The variable a .env line sets, as dotenv reads it (BOM, ``export`` + any blank)."""
    text = line.removeprefix(BOM).strip()
    if text.startswith("export") and text[6:7] in (" ", "\t"):
        text = text[6:].lstrip()
    return text.partition("=")[0].strip()


if __name__ == "__main__":
    raise SystemExit(main())
