"""Inventory validation: every problem at once, naming the file, the key and the fix."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from opsdrill.config.inventory import load
from opsdrill.errors import ConfigError
from tests.conftest import opsdrill

GOOD = """
name = "prod"
environment = "production"

[stores.offsite]
endpoint = "minio.example.net:9000"
bucket = "crm-backups"
prefix = "pg"
access_key_env = "T_S3_ACCESS"
secret_key_env = "T_S3_SECRET"

[gpg]
recipients = ["0123456789ABCDEF0123456789ABCDEF01234567"]
public_keys_file = "keys.asc"

[databases.crm]
dsn = "postgresql://backup@db.internal:5432/crm"
password_env = "T_DB_PASSWORD"
rpo_minutes = 60
"""
ENV = {
    "T_S3_ACCESS": "access-key-1",
    "T_S3_SECRET": "secret-key-1",
    "T_DB_PASSWORD": "db-password-1",
}


def write(tmp_path: Path, text: str, keys: bool = True) -> Path:
    if keys:
        (tmp_path / "keys.asc").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return path


def error_of(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, environ=ENV if environ is None else environ)
    return info.value.message


def test_good_inventory_loads_and_resolves_secrets(tmp_path: Path) -> None:
    inv = load(write(tmp_path, GOOD), environ=ENV)
    assert inv.name == "prod"
    assert inv.database("crm").rpo_minutes == 60
    assert inv.secret("T_DB_PASSWORD") == "db-password-1"
    assert "db-password-1" not in repr(inv)
    assert inv.store_for("crm")[0] == "offsite"


def test_unknown_key_is_named_with_fix(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("rpo_minutes = 60", "rpo_minuts = 60"))
    msg = error_of(path)
    assert f"{path}: databases.crm.rpo_minuts: unknown key" in msg
    assert "fix: remove it or check its spelling" in msg


def test_wrong_type_is_named(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD.replace("rpo_minutes = 60", 'rpo_minutes = "hourly"')))
    assert "databases.crm.rpo_minutes" in msg and "'hourly'" in msg


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("rpo_minutes = 60", "rpo_minutes = -1\nbogus = 1").replace(
        'bucket = "crm-backups"', 'bucket = "x"'
    )
    msg = error_of(write(tmp_path, text))
    assert "rpo_minutes" in msg and "bogus" in msg and "stores.offsite.bucket" in msg
    assert len(msg.splitlines()) == 3


def test_missing_env_var_names_variable_and_fix(tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "T_DB_PASSWORD"}
    msg = error_of(write(tmp_path, GOOD), env)
    assert "databases.crm.password_env: environment variable T_DB_PASSWORD is not set" in msg
    assert "fix: export T_DB_PASSWORD=" in msg


def test_password_inside_dsn_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    text = GOOD.replace("postgresql://backup@", "postgresql://backup:hunter2hunter2@")
    msg = error_of(write(tmp_path, text))
    assert "databases.crm.dsn: contains a password" in msg
    assert "hunter2hunter2" not in msg


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "\n[databases.crm\n")
    msg = error_of(path)
    assert str(path) in msg and "not valid TOML" in msg


def test_missing_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path / "nope.toml")
    assert "inventory file not found" in msg


def test_bad_fingerprint_and_scheme_in_endpoint(tmp_path: Path) -> None:
    text = GOOD.replace("0123456789ABCDEF0123456789ABCDEF01234567", "DEADBEEF").replace(
        '"minio.example.net:9000"', '"https://minio.example.net:9000"'
    )
    msg = error_of(write(tmp_path, text))
    assert "gpg.recipients" in msg and "not a full OpenPGP fingerprint" in msg
    assert "stores.offsite.endpoint" in msg and "without a scheme" in msg


def test_encryption_without_gpg_section_is_an_error(tmp_path: Path) -> None:
    text = GOOD.split("[gpg]")[0] + GOOD.split('public_keys_file = "keys.asc"')[1]
    msg = error_of(write(tmp_path, text))
    assert "encrypt = true needs a [gpg] section" in msg


def test_unknown_store_reference(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD + 'store = "elsewhere"\n'))
    assert "databases.crm.store: no store 'elsewhere'" in msg


def test_missing_key_file(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD, keys=False))
    assert "gpg.public_keys_file: file" in msg and "not found" in msg


def test_env_file_supplies_missing_variables(tmp_path: Path) -> None:
    (tmp_path / "secrets.env").write_text(
        "# comment\nexport T_DB_PASSWORD='from-file-pw'\nT_S3_ACCESS=a-key\nT_S3_SECRET=s-key\n"
    )
    (tmp_path / "secrets.env").chmod(0o600)
    inv = load(write(tmp_path, 'env_file = "secrets.env"\n' + GOOD), environ={})
    assert inv.secret("T_DB_PASSWORD") == "from-file-pw"
    # the environment wins over the file
    inv = load(tmp_path / "inventory.toml", environ={"T_DB_PASSWORD": "from-env-pw"})
    assert inv.secret("T_DB_PASSWORD") == "from-env-pw"


def test_cli_inventory_check_exit_codes(tmp_path: Path) -> None:
    from opsdrill_stack.gnupg_keys import generate_keypair

    key = generate_keypair(tmp_path / "k", "backup", "passphrase-1234")
    path = write(
        tmp_path,
        GOOD.replace("0123456789ABCDEF0123456789ABCDEF01234567", key.fingerprint).replace(
            '"keys.asc"', f'"{key.public_file}"'
        ),
    )
    env = {**os.environ, **ENV}
    ok = opsdrill("inventory", "check", str(path), env=env)
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = write(tmp_path, path.read_text().replace("rpo_minutes", "rpo"))
    proc = opsdrill("inventory", "check", str(bad), env=env)
    assert proc.returncode == 2
    assert "databases.crm.rpo: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_retention_daily_must_cover_hourly(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD + "\n[retention]\nhourly_days = 7\ndaily_days = 3\n"))
    assert "retention" in msg and "daily_days (3) must be at least hourly_days (7)" in msg


def test_backup_scope_needs_no_drill_secrets(tmp_path: Path) -> None:
    text = (
        GOOD.replace(
            'public_keys_file = "keys.asc"',
            'public_keys_file = "keys.asc"\ndrill_private_key_file = "drill.asc"\n'
            'drill_passphrase_env = "T_GPG_PASS"',
        )
        + '\n[databases.crm.sandbox]\ndsn = "postgresql://x@sandbox/postgres"\n'
        'password_env = "T_SANDBOX_PW"\n'
    )
    path = write(tmp_path, text)
    inv = load(path, environ=ENV, scope="backup")  # a backup host holds no drill key
    assert inv.database("crm").sandbox is not None
    msg = error_of(path)
    assert "T_GPG_PASS is not set" in msg and "T_SANDBOX_PW is not set" in msg
    assert "gpg.drill_private_key_file: file" in msg
    env = {k: v for k, v in ENV.items() if k != "T_DB_PASSWORD"}
    assert load(path, environ=env, scope="store").name == "prod"  # list/prune: S3 only


def test_empty_key_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    (tmp_path / "keys.asc").write_text("")
    assert "gpg.public_keys_file: file" in error_of(path) and "is empty" in error_of(path)


def test_documented_example_inventory_is_valid() -> None:
    """docs/inventory.example.toml must stay in step with the schema."""
    import tomllib

    from opsdrill.config.inventory import InventoryModel

    root = Path(__file__).resolve().parents[2]
    model = InventoryModel.model_validate(
        tomllib.loads((root / "docs" / "inventory.example.toml").read_text())
    )
    assert {"crm"} == set(model.databases) and {"files"} == set(model.mirrors)
    assert {"app"} == set(model.secrets)
    from opsdrill.config.mail import mail_cross_checks

    assert {"example.com", "news.example.com"} == set(model.sending_domains)
    assert model.dns is not None and model.sending_domain_discovery is not None
    assert mail_cross_checks(root / "docs" / "inventory.example.toml", model) == []
    assert {"transactional", "portal-invite"} == set(model.probes)
    assert [p.kind for p in model.probes.values()] == ["direct", "triggered"]
    assert {"crm"} == set(model.app_environment) and {"email"} == set(model.queues)


# -- mail authentication sections (opsdrill.config.mail) ---------------------------------
MAIL = """
[dns]
nameservers = ["127.0.0.1", "::1"]
port = 5353
timeout_seconds = 1.5

[mail_providers.relay-one]
spf = ["include:_spf.relay-one.test"]
dkim_selectors = ["r1"]
dkim_cname_suffix = "dkim.relay-one.test"

[mail_providers.relay-two]
spf = ["include:_spf.relay-two.test", "ip4:192.0.2.0/24"]
dkim_selectors = ["R2"]

[sending_domains."Example.TEST."]
providers = ["relay-one"]
dkim_selectors = ["sel1"]
receives_mail = true
forbidden_mx = ["App.Example.test"]
sending_ips = ["127.0.0.1"]
dkim_min_rsa_bits = 2048
dmarc = { min_policy = "reject", min_subdomain_policy = "quarantine", adkim = "r" }
migration = { from = "relay-one", to = "relay-two", until = 2030-01-01T00:00:00Z }

[sending_domains."portal.example.net"]
providers = ["relay-one"]
receives_mail = false

[sending_domain_discovery]
database = "crm"
query = "SELECT DISTINCT split_part(from_address, '@', 2) FROM crm.email_settings"
"""


def test_mail_sections_load_normalised_with_accessors(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    inv = load(write(tmp_path, GOOD + MAIL), environ=ENV)
    assert list(inv.model.sending_domains) == ["example.test", "portal.example.net"]
    main = inv.sending_domain("EXAMPLE.test.")
    assert main.forbidden_mx == ["app.example.test"]
    assert main.dmarc.subdomain_minimum == "quarantine" and main.dmarc.aspf is None
    assert inv.dns.nameservers == ["127.0.0.1", "::1"] and inv.dns.port == 5353
    during, after = datetime(2029, 6, 1, tzinfo=UTC), datetime(2030, 6, 1, tzinfo=UTC)
    assert list(inv.providers_for("example.test", during)) == ["relay-one", "relay-two"]
    assert list(inv.providers_for("example.test", after)) == ["relay-one"]
    assert main.migrating(during) and not main.migrating(after)
    selectors = inv.dkim_selectors_for("example.test", during)
    assert [(s.selector, s.provider, s.cname_suffix) for s in selectors] == [
        ("sel1", None, None),
        ("r1", "relay-one", "dkim.relay-one.test"),
        ("r2", "relay-two", None),
    ]
    portal = inv.sending_domain("portal.example.net")
    assert portal.dmarc.min_policy == "reject" and portal.dkim_min_rsa_bits == 2048
    with pytest.raises(ConfigError, match=r"no sending_domains\.other\.test"):
        inv.sending_domain("other.test")


def test_dns_defaults_to_the_system_resolver(tmp_path: Path) -> None:
    inv = load(write(tmp_path, GOOD), environ=ENV)
    assert inv.dns.nameservers == [] and inv.dns.port == 53 and inv.dns.timeout_seconds == 2.0
    assert inv.model.sending_domains == {} and inv.model.sending_domain_discovery is None


def test_mail_sections_need_no_secrets_in_any_scope(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + MAIL)
    env = {k: v for k, v in ENV.items() if k != "T_DB_PASSWORD"}
    assert load(path, environ=env, scope="store").sending_domain("example.test").receives_mail
    assert load(path, environ=ENV, scope="backup").dns.port == 5353


def test_unknown_provider_and_bad_migration_are_named(tmp_path: Path) -> None:
    text = GOOD + MAIL.replace(
        'providers = ["relay-one"]\nreceives_mail = false',
        'providers = ["ses"]\nreceives_mail = false',
    ).replace('to = "relay-two"', 'to = "relay-9"')
    msg = error_of(write(tmp_path, text))
    assert (
        "sending_domains.\"portal.example.net\".providers: no mail provider 'ses' "
        "(fix: use one of ['relay-one', 'relay-two'] or add [mail_providers.ses])" in msg
    )
    assert "sending_domains.\"example.test\".migration.to: no mail provider 'relay-9'" in msg
    # portal.example.net now has no selector at all: DKIM would go unchecked
    assert 'sending_domains."portal.example.net": no DKIM selector is expected' in msg
    assert len(msg.splitlines()) == 3


def test_migration_to_itself_and_without_time_zone(tmp_path: Path) -> None:
    same = MAIL.replace('to = "relay-two"', 'to = "relay-one"')
    msg = error_of(write(tmp_path, GOOD + same))
    assert "migration: from and to are both 'relay-one'" in msg
    naive = MAIL.replace("2030-01-01T00:00:00Z", "2030-01-01T00:00:00")
    msg = error_of(write(tmp_path, GOOD + naive))
    assert 'sending_domains."Example.TEST.".migration.until: until needs a time zone' in msg


def test_discovery_database_must_exist(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD + MAIL.replace('database = "crm"', 'database = "app"')))
    assert "sending_domain_discovery.database: no database 'app' (fix: use one of ['crm'])" in msg
    bad = MAIL.replace('query = "SELECT', 'query = "DELETE FROM x; SELECT')
    msg = error_of(write(tmp_path, GOOD + bad))
    assert "sending_domain_discovery.query: query must be a single read-only SELECT" in msg


def test_unknown_key_and_bad_values_in_mail_sections(tmp_path: Path) -> None:
    text = (
        MAIL.replace("dkim_min_rsa_bits = 2048", "dkim_min_bits = 2048")
        .replace('min_policy = "reject"', 'min_policy = "strict"')
        .replace('sending_ips = ["127.0.0.1"]', 'sending_ips = ["127.0.0.300"]')
        .replace('nameservers = ["127.0.0.1", "::1"]', 'nameservers = ["dns.example"]')
        .replace('forbidden_mx = ["App.Example.test"]', 'forbidden_mx = ["app..test"]')
        .replace("timeout_seconds = 1.5", "timeout_seconds = 60")
        .replace('"ip4:192.0.2.0/24"', '"~all"')
    )
    msg = error_of(write(tmp_path, GOOD + text))
    where = f'{tmp_path / "inventory.toml"}: sending_domains."Example.TEST."'
    assert f"{where}.dkim_min_bits: unknown key" in msg
    assert "fix: remove it or check its spelling" in msg
    assert (
        f"{where}.dmarc.min_policy: Input should be 'none', 'quarantine' or 'reject', "
        "found 'strict'" in msg
    )
    assert f"{where}.sending_ips.0: not an IPv4 or IPv6 address, found '127.0.0.300'" in msg
    assert f"{where}.forbidden_mx.0: not a fully qualified domain name" in msg
    assert "dns.nameservers.0: not an IPv4 or IPv6 address, found 'dns.example'" in msg
    assert "dns.timeout_seconds: Input should be less than or equal to 30" in msg
    assert "mail_providers.relay-two.spf.1: give the mechanism without a qualifier" in msg
    assert len(msg.splitlines()) == 7


def test_same_domain_twice_and_selector_listed_twice(tmp_path: Path) -> None:
    twice = MAIL + '\n[sending_domains."example.test"]\nproviders = ["relay-one"]\n'
    twice += "receives_mail = true\n"
    msg = error_of(write(tmp_path, GOOD + twice))
    assert "'Example.TEST.' and 'example.test' are the same domain" in msg
    dup = MAIL.replace('dkim_selectors = ["sel1"]', 'dkim_selectors = ["sel1", "R1"]')
    msg = error_of(write(tmp_path, GOOD + dup))
    assert "dkim_selectors: 'r1' is already provider 'relay-one''s selector" in msg


def test_policy_order() -> None:
    from opsdrill.config.mail import policy_at_least

    assert policy_at_least("reject", "quarantine") and policy_at_least("Quarantine", "none")
    assert not policy_at_least("none", "quarantine") and not policy_at_least("rejekt", "none")


# -- delivery probes, app environment, queues (opsdrill.config.probes) --------------------
PROBES = """
[probes.transactional]
from_address = "crm@Example.TEST"
to_address = "probe@mailbox.test"
timeout_seconds = 30.0
max_latency_seconds = 10.0
trusted_authserv_ids = ["MX.mailbox.test"]
spamd = { host = "127.0.0.1", port = 783, max_score = 5.0 }

[probes.transactional.smtp]
host = "smtp.relay-one.test"
port = 587
tls = "starttls"
user = "crm@example.test"
password_env = "T_SMTP_PASSWORD"

[probes.transactional.imap]
host = "imap.mailbox.test"
port = 993
tls = "tls"
user = "probe@mailbox.test"
password_env = "T_IMAP_PASSWORD"
folders = ["INBOX"]
junk_folders = ["Junk"]

[probes.portal-invite]
imap = { host = "imap.mailbox.test", user = "probe@mailbox.test", password_env = "T_IMAP_PASSWORD" }

[probes.portal-invite.trigger]
url = "https://crm.example.test/api/portal/invite"
method = "POST"
json = { email = "probe@mailbox.test", name = "Probe {token}" }
bearer_token_env = "T_APP_TOKEN"

[probes.portal-invite.expect]
to = "probe@mailbox.test"
subject_pattern = "invited"
link_pattern = 'https://\\S+/activate\\?token=\\w+'
fetch_link = true
window_seconds = 120

[app_environment.crm]
command = ["docker", "exec", "crm-web", "printenv"]

[queues.email]
redis = { host = "redis.internal.test", tls = true, password_env = "T_REDIS_PASSWORD" }
queue = "email"
max_waiting = 100
max_oldest_age_seconds = 600
"""
PROBE_ENV = {
    **ENV,
    "T_SMTP_PASSWORD": "smtp-password-1",
    "T_IMAP_PASSWORD": "imap-password-1",
    "T_APP_TOKEN": "app-token-1",
    "T_REDIS_PASSWORD": "redis-password-1",
}


def probe_error(tmp_path: Path, text: str) -> str:
    return error_of(write(tmp_path, GOOD + text), environ=PROBE_ENV)


def test_probe_sections_load_with_accessors(tmp_path: Path) -> None:
    inv = load(write(tmp_path, GOOD + PROBES), environ=PROBE_ENV)
    direct, triggered = inv.probe("transactional"), inv.probe("portal-invite")
    assert (direct.kind, triggered.kind) == ("direct", "triggered")
    assert direct.from_address == "crm@example.test"  # the domain is normalised
    assert direct.trusted_authserv_ids == ["mx.mailbox.test"]
    assert direct.smtp is not None and direct.smtp.password_env == "T_SMTP_PASSWORD"
    assert direct.spamd is not None and direct.spamd.max_score == 5.0
    # defaults: IMAPS on 993, INBOX searched, Junk as the junk folder, IDLE
    imap = triggered.imap
    assert (imap.port, imap.tls, imap.folders, imap.junk_folders) == (
        993,
        "tls",
        ["INBOX"],
        ["Junk"],
    )
    assert triggered.use_idle and triggered.timeout_seconds == 30.0
    trigger, expect = triggered.trigger, triggered.expect
    assert trigger is not None
    assert trigger.json_body == {"email": "probe@mailbox.test", "name": "Probe {token}"}
    assert expect is not None and expect.fetch_link and expect.link_pattern
    assert re.search(expect.link_pattern, "see https://crm.test/activate?token=abc_1 now")
    assert inv.app_environment("crm").forbidden_keys == ["EMAIL_REDIRECT_TO"]
    queue = inv.queue("email")
    assert (queue.prefix, queue.redis.port, queue.redis.db, queue.redis.tls) == (
        "bull",
        6379,
        0,
        True,
    )
    assert inv.secret(queue.redis.password_env or "") == "redis-password-1"
    with pytest.raises(ConfigError, match=r"no probes\.other \(inventory has: portal-invite"):
        inv.probe("other")
    with pytest.raises(ConfigError, match=r"no queues\.jobs"):
        inv.queue("jobs")


def test_probe_secrets_are_needed_for_checks_only(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + PROBES)
    msg = error_of(path, environ=ENV)
    for key, var in (
        ("probes.transactional.smtp.password_env", "T_SMTP_PASSWORD"),
        ("probes.transactional.imap.password_env", "T_IMAP_PASSWORD"),
        ("probes.portal-invite.trigger.bearer_token_env", "T_APP_TOKEN"),
        ("queues.email.redis.password_env", "T_REDIS_PASSWORD"),
    ):
        assert f"{key}: environment variable {var} is not set (fix: export {var}=...)" in msg
    assert load(path, environ=ENV, scope="backup").probe("transactional").kind == "direct"


def test_probe_is_direct_or_triggered_never_both(tmp_path: Path) -> None:
    both = PROBES.replace(
        'to_address = "probe@mailbox.test"\n',
        'to_address = "probe@mailbox.test"\ntrigger = { url = "http://127.0.0.1:8080/x" }\n',
    )
    assert (
        "probes.transactional: a probe is either direct (smtp, from_address, to_address) or "
        "triggered (trigger, expect), not both: found smtp, from_address, to_address, trigger"
    ) in probe_error(tmp_path, both)
    neither = (
        '[probes.x]\nimap = { host = "h.test", user = "u", password_env = "T_IMAP_PASSWORD" }\n'
    )
    assert "probes.x: neither direct (smtp, from_address, to_address) nor triggered" in (
        probe_error(tmp_path, neither)
    )
    expect = PROBES[PROBES.index("[probes.portal-invite.expect]") : PROBES.index("[app_env")]
    half = PROBES.replace('to_address = "probe@mailbox.test"\n', "").replace(expect, "")
    msg = probe_error(tmp_path, half)
    assert "probes.transactional: a direct probe also needs to_address (fix: add it)" in msg
    assert "probes.portal-invite: a triggered probe also needs expect (fix: add it)" in msg


def test_bad_probe_values_are_all_named(tmp_path: Path) -> None:
    text = (
        PROBES.replace('tls = "starttls"', 'tls = "ssl"')
        .replace('tls = "tls"', 'tls = "none"')
        .replace('to_address = "probe@mailbox.test"', 'to_address = "probe"')
        .replace('bearer_token_env = "T_APP_TOKEN"', 'bearer_token_env = "T_APP_TOKEN"\nport = 1')
        .replace('subject_pattern = "invited"', 'subject_pattern = "(invited"')
        .replace('json = { email = "probe@mailbox.test", name = "Probe {token}" }', "")
        .replace(
            'bearer_token_env = "T_APP_TOKEN"',
            'bearer_token_env = "T_APP_TOKEN"\ntimeout_seconds = 0',
            1,
        )
        .replace('queue = "email"', 'queue = "email"\nbogus = 1')
    )
    msg = probe_error(tmp_path, text)
    where = f"{tmp_path / 'inventory.toml'}: probes"
    assert f"{where}.transactional.smtp.tls: Input should be 'starttls', 'tls' or 'none'" in msg
    assert (
        f"{where}.transactional.imap: tls = 'none' would send the password in clear to "
        "imap.mailbox.test; it is allowed for 127.0.0.1 only (fix: use 'starttls' or 'tls')"
    ) in msg
    assert f"{where}.transactional.to_address: not an email address (local@domain)" in msg
    assert f"{where}.portal-invite.trigger.port: unknown key" in msg
    assert f"{where}.portal-invite.trigger.timeout_seconds: Input should be greater than 0" in msg
    assert f"{where}.portal-invite.expect.subject_pattern: not a valid regular expression" in msg
    assert "queues.email.bogus: unknown key" in msg
    assert len(msg.splitlines()) == 7
    late = PROBES.replace("max_latency_seconds = 10.0", "max_latency_seconds = 60.0")
    assert "max_latency_seconds (60) exceeds timeout_seconds (30)" in probe_error(tmp_path, late)
    slow = PROBES.replace("port = 587\n", "port = 587\ntimeout_seconds = 3000\n")
    assert (
        "probes.transactional.smtp.timeout_seconds: Input should be less than or equal to 300"
    ) in probe_error(tmp_path, slow)
    local = PROBES.replace(
        'host = "imap.mailbox.test"\nport = 993\ntls = "tls"',
        ('host = "127.0.0.1"\nport = 143\ntls = "none"'),
    )
    assert load(write(tmp_path, GOOD + local), environ=PROBE_ENV).probe("transactional")


def test_secrets_stay_out_of_probe_sections(tmp_path: Path) -> None:
    text = PROBES.replace(
        'url = "https://crm.example.test/api/portal/invite"',
        'url = "https://u:pw@crm.example.test/x"\nheaders = { Authorization = "Bearer x" }',
    ).replace('password_env = "T_IMAP_PASSWORD"\nfolders', 'password_env = "imap pw"\nfolders')
    msg = probe_error(tmp_path, text)
    assert (
        "probes.portal-invite.trigger.url: contains a password (fix: use bearer_token_env)" in msg
    )
    assert "trigger.headers: secrets go in bearer_token_env, not in headers" in msg
    assert (
        "probes.transactional.imap.password_env: is not an environment variable name (it looks "
        "like a value: never put a secret in the inventory)"
    ) in msg
    assert "imap pw" not in msg


def test_app_environment_needs_exactly_one_source(tmp_path: Path) -> None:
    command = 'command = ["docker", "exec", "crm-web", "printenv"]'
    for text in (
        PROBES.replace(command, command + '\nenv_file = "app.env"'),
        PROBES.replace(command, ""),
    ):
        msg = probe_error(tmp_path, text)
        assert "app_environment.crm: set exactly one of env_file or command" in msg
    relative = PROBES.replace(command, 'env_file = "app/.env"\nforbidden_keys = ["DEBUG"]')
    inv = load(write(tmp_path, GOOD + relative), environ=PROBE_ENV)
    env = inv.app_environment("crm")
    assert env.forbidden_keys == ["DEBUG"] and env.env_file is not None
    assert inv.resolve_path(env.env_file) == tmp_path.resolve() / "app/.env"


# -- a secret where a variable NAME belongs is never printed back ---------------------------
SECRET_KEYS = {
    # inventory key: the TOML line it is set by (its value planted below)
    "stores.offsite.access_key_env": 'access_key_env = "T_S3_ACCESS"',
    "stores.offsite.secret_key_env": 'secret_key_env = "T_S3_SECRET"',
    "databases.crm.password_env": 'password_env = "T_DB_PASSWORD"',
    "gpg.drill_passphrase_env": 'public_keys_file = "keys.asc"',
    "databases.crm.sandbox.password_env": "",
    "probes.transactional.smtp.password_env": 'password_env = "T_SMTP_PASSWORD"',
    "probes.transactional.imap.password_env": 'password_env = "T_IMAP_PASSWORD"\nfolders',
    "probes.portal-invite.trigger.bearer_token_env": 'bearer_token_env = "T_APP_TOKEN"',
    "queues.email.redis.password_env": 'password_env = "T_REDIS_PASSWORD" }',
}
# Shapes of real secrets: symbols, a mixed-case word, an access key id, a number.
PLANTED = [
    "Tr0ub4dor&3",
    "correct horse battery staple",
    "Hunter2Hunter2",
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    "p@ss:w0rd$",
    "s3cr3t_lower_case",
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    "-----BEGIN PGP-----",
]


def planted_inventory(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """GOOD + PROBES with a secret value in every ``*_env`` key (and two more places a
    secret goes by mistake: a ``password`` key, a number in ``password_env``)."""
    text = GOOD + PROBES + '\n[databases.crm.sandbox]\ndsn = "postgresql://x@sandbox/postgres"\n'
    text += 'password_env = "T_SANDBOX_PW"\n'
    values = {}
    for i, (key, line) in enumerate(SECRET_KEYS.items()):
        value = PLANTED[i]
        quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        values[key] = value
        if key == "gpg.drill_passphrase_env":
            text = text.replace(line, f"{line}\ndrill_passphrase_env = {quoted}")
        elif key == "databases.crm.sandbox.password_env":
            text = text.replace('password_env = "T_SANDBOX_PW"', f"password_env = {quoted}")
        else:
            var = line.split('"')[1]
            assert text.count(f'"{var}"') >= 1, key
            text = text.replace(line, line.replace(f'"{var}"', quoted), 1)
    return write(tmp_path, text), values


def assert_not_shown(values: dict[str, str], output: str) -> None:
    shown = {k: v for k, v in values.items() if v in output}
    assert not shown, f"secret values printed back: {shown}\n{output}"


def test_a_secret_in_an_env_key_is_named_never_shown(tmp_path: Path) -> None:
    path, values = planted_inventory(tmp_path)
    msg = error_of(path, environ=PROBE_ENV)
    assert_not_shown(values, msg)
    for key in values:
        assert (
            f"{key}: is not an environment variable name (it looks like a value: never put a "
            "secret in the inventory)"
        ) in msg, key
    assert len(msg.splitlines()) == len(values), msg


def test_cli_inventory_check_never_prints_a_planted_secret(tmp_path: Path) -> None:
    path, values = planted_inventory(tmp_path)
    # and two more mistakes: a password given directly, a number where a name belongs
    text = path.read_text().replace(
        'dsn = "postgresql://x@sandbox/postgres"',
        'dsn = "postgresql://x@sandbox/postgres"\npassword = "Direct-Pa55word!"',
    )
    path.write_text(text.replace('name = "prod"', 'name = "prod"\nextra_token = "tok-Xy9-zz"'))
    values |= {"password": "Direct-Pa55word!", "extra_token": "tok-Xy9-zz"}
    proc = opsdrill("inventory", "check", str(path), env={**os.environ, **PROBE_ENV})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_not_shown(values, proc.stdout + proc.stderr)
    assert "databases.crm.sandbox.password: unknown key" in proc.stderr
    assert "is not an environment variable name" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_check_run_never_prints_a_planted_secret(tmp_path: Path) -> None:
    from tests.conftest import run_checks

    path, values = planted_inventory(tmp_path)
    run = run_checks(path, "check_dns_mx.py")
    assert run.returncode == 2, run.output[-3000:]
    assert "is not an environment variable name" in run.output
    assert_not_shown(values, run.output)


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("password_env = 12345678", "12345678"),
        ('password_env = "lower_case_name"', "lower_case_name"),
        ('password_env = "Hunter2"', "Hunter2"),
        ('password_env = ["Tr0ub4dor&3"]', "Tr0ub4dor&3"),
    ],
)
def test_wrong_types_and_lower_case_names_are_not_echoed(
    tmp_path: Path, line: str, value: str
) -> None:
    msg = error_of(write(tmp_path, GOOD.replace('password_env = "T_DB_PASSWORD"', line)))
    assert "databases.crm.password_env:" in msg and value not in msg


def test_no_other_validation_error_echoes_a_secret_looking_field(tmp_path: Path) -> None:
    probes = PROBES.replace(
        'url = "https://crm.example.test/api/portal/invite"',
        'url = "ftp://user:Pa55-in-url@crm.example.test/x"\n'
        'headers = { X-Api-Key = 4242424242, Accept = "json" }',
    )
    good = GOOD.replace('"minio.example.net:9000"', '"AKIA:sEcReT-kEy-1@minio:9000"')
    msg = error_of(write(tmp_path, good + probes), environ=PROBE_ENV)
    assert "probes.portal-invite.trigger.url" in msg and "stores.offsite.endpoint" in msg
    assert "trigger.headers.X-Api-Key" in msg
    for value in ("Pa55-in-url", "4242424242", "sEcReT-kEy-1"):
        assert value not in msg, (value, msg)


# -- endpoints that would only fail at run time ---------------------------------------------
@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        ("", "empty"),
        ("minio.example.net:9000/backups", "host:port only, without a path"),
        ("minio.example.net:notaport", "port 'notaport' is not a number"),
        ("minio.example.net:", "port '' is not a number"),
        ("minio.example.net:0", "port 0 is out of range (1-65535)"),
        ("minio.example.net:65536", "port 65536 is out of range (1-65535)"),
        (" minio.example.net:9000", "contains whitespace"),
        ("minio.example.net:9000\n", "contains whitespace"),
        ("minio example.net:9000", "contains whitespace"),
        ("::1:9000", "an IPv6 address goes in brackets"),
        ("[minio]:9000", "not an IPv6 address"),
        ("minio!.example.net:9000", "not a host name or IP address"),
        ("minio.example.net:9000?x=1", "host:port only, without a path"),
    ],
)
def test_store_endpoints_that_fail_at_run_time_are_rejected(
    tmp_path: Path, endpoint: str, says: str
) -> None:
    toml_value = endpoint.replace("\n", "\\n")
    text = GOOD.replace('"minio.example.net:9000"', f'"{toml_value}"')
    msg = error_of(write(tmp_path, text))
    assert f"stores.offsite.endpoint: {says}" in msg, msg


@pytest.mark.parametrize(
    "endpoint",
    ["minio.example.net:9000", "minio.example.net", "127.0.0.1:9000", "[::1]:9000", "s3_1:443"],
)
def test_store_endpoints_that_work_are_accepted(tmp_path: Path, endpoint: str) -> None:
    text = GOOD.replace('"minio.example.net:9000"', f'"{endpoint}"')
    assert load(write(tmp_path, text), environ=ENV).store("offsite").endpoint == endpoint


def test_cli_inventory_check_rejects_bad_endpoints_naming_the_field(tmp_path: Path) -> None:
    text = GOOD.replace('"minio.example.net:9000"', '"minio.example.net:9000/crm"')
    proc = opsdrill("inventory", "check", str(write(tmp_path, text)), env={**os.environ, **ENV})
    assert proc.returncode == 2
    assert "stores.offsite.endpoint: host:port only, without a path" in proc.stderr


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ('host = "smtp.relay-one.test"', 'host = " smtp.relay-one.test"', "smtp.host: contains"),
        ('host = "imap.mailbox.test"\nport', 'host = "imap mailbox"\nport', "imap.host: contains"),
        ('host = "imap.mailbox.test"\nport', 'host = "imap/x"\nport', "imap.host: a host name"),
        ('host = "127.0.0.1", port = 783', 'host = "127.0.0.1:783"', "spamd.host: a host name"),
        ('host = "127.0.0.1", port = 783', 'host = "", port = 783', "spamd.host: empty"),
        ('host = "127.0.0.1", port = 783', 'host = "spam d", port = 783', "spamd.host: contains"),
        ('{ host = "redis.internal.test"', '{ host = "redis.internal.test\\t"', "redis.host: cont"),
        ('{ host = "redis.internal.test"', '{ host = "[::1]"', "redis.host: not a host name"),
        ("port = 587", "port = 70000", "smtp.port: Input should be less than or equal to 65535"),
        ("port = 587", 'port = "587"', "smtp.port: Input should be a valid integer"),
        ("/api/portal/invite", ":99999/x", "trigger.url: port 99999 is out of range"),
        ("/api/portal/invite", ":abc/x", "trigger.url: port 'abc' is not a number"),
        ("crm.example.test/api", "crm.example.test /api", "trigger.url: contains whitespace"),
    ],
)
def test_probe_spamd_and_redis_hosts_are_checked(
    tmp_path: Path, old: str, new: str, says: str
) -> None:
    assert old in PROBES, old
    msg = probe_error(tmp_path, PROBES.replace(old, new, 1))
    assert says in msg, msg


def test_probe_hosts_that_work_are_accepted(tmp_path: Path) -> None:
    text = PROBES.replace('host = "imap.mailbox.test"\nport', 'host = "::1"\nport').replace(
        'host = "127.0.0.1", port = 783', 'host = "spamd_1.internal", port = 783'
    )
    inv = load(write(tmp_path, GOOD + text), environ=PROBE_ENV)
    assert inv.probe("transactional").imap.host == "::1"
