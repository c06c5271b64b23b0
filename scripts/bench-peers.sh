#!/usr/bin/env bash
# The peer tools `make bench` compares opsdrill with, installed only when missing: pgBackRest
# (with stunnel4: it speaks only HTTPS to S3), rclone, check_email_delivery
# (monitoring-plugins-contrib and the Perl modules it loads) from Debian, and checkdmarc
# from PyPI into its own venv (PEERS_DIR, never opsdrill's). A benchmark prints SKIP for a
# peer that is still missing.
set -euo pipefail
peers_dir="${PEERS_DIR:-/var/tmp/opsdrill-peers}"
packages=(pgbackrest stunnel4 rclone monitoring-plugins-contrib libnet-smtp-tls-perl
  libmail-imapclient-perl libio-socket-ssl-perl libnet-ssleay-perl libnet-smtp-ssl-perl
  libauthen-sasl-perl libemail-simple-perl)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench-peers: missing Debian packages: ${missing[*]} (run as root); benchmarks skip those peers" >&2
  else
    echo "bench-peers: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
    if [ ! -e /usr/sbin/policy-rc.d ]; then  # no system-wide daemons (stunnel4, pgbackrest)
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
if [ ! -x "$peers_dir/checkdmarc/bin/checkdmarc" ]; then
  echo "bench-peers: installing checkdmarc 6.0.4 into $peers_dir/checkdmarc"
  "${PYTHON:-python3}" -m venv "$peers_dir/checkdmarc"
  "$peers_dir/checkdmarc/bin/python" -m pip install -q --disable-pip-version-check checkdmarc==6.0.4
fi
