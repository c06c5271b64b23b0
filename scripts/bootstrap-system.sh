#!/usr/bin/env bash
# Install the Debian packages opsdrill needs, only those missing (idempotent, quiet when done).
set -euo pipefail
# knot: the local stack's authoritative DNS server (knotd, knotc); knot-dnsutils: kdig.
packages=(postgresql postgresql-contrib zstd gzip pigz gnupg util-linux procps knot knot-dnsutils)
# The local stack's mail servers (all run by opsdrill on 127.0.0.1, never system-wide):
# Postfix (submission), Dovecot (IMAP, LMTP, sieve), OpenDKIM (signing milter),
# SpamAssassin (spamd + spamc: local scoring), Redis (the BullMQ queue), openssl.
packages+=(postfix dovecot-imapd dovecot-lmtpd dovecot-sieve opendkim opendkim-tools
  spamassassin spamc spamd redis-server openssl)
# faketime (libfaketime): tests/faults/test_prune_safety.py runs the real CLI and checks with the
# host clock off from the S3 server's, to prove prune refuses to judge ages by it.
packages+=(faketime)
# docker.io + debootstrap: the container tests (tests/helpers/containers.py) start their own dockerd
# when none runs and build their PostgreSQL images from a debootstrap rootfs (no image
# registry needed); docker.io's own service is not started (policy-rc.d below).
packages+=(docker.io debootstrap)
# chromium: renders the Allure report in tests/integration/test_report.py (headless). CI jobs that only
# verify and report set OPSDRILL_SKIP_BROWSER=1 (ci-templates/): they never open the report.
if [ "${OPSDRILL_SKIP_BROWSER:-}" != 1 ]; then
  packages+=(chromium)
fi
# npm (and Debian's nodejs with it) installs Allure 3 for `make report`. A Node.js from
# elsewhere (nodesource, nvm) ships its own npm: then Debian's would conflict, so skip it.
if ! command -v npm >/dev/null 2>&1; then
  packages+=(npm)
fi
# Debian's own python3 needs python3-venv for `python3 -m venv`; a pyenv/other Python has it.
if ! "${PYTHON:-python3}" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  packages+=(python3-venv python3-pip)
fi
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
    exit 2
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
  # Keep packaged daemons from starting their own system-wide instances.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # Postfix asks what kind of mail system this is: none (opsdrill writes its own config).
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # spamassassin's postinst imports its update keys and leaves a gpg-agent behind.
  if [ -d /var/lib/spamassassin/sa-update-keys ]; then
    gpgconf --homedir /var/lib/spamassassin/sa-update-keys --kill gpg-agent 2>/dev/null || true
  fi
fi
