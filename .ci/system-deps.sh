#!/usr/bin/env bash
# System packages merflow needs beyond PyPI: espeak-ng (demo corpus speech), PostgreSQL's
# server (the tests run a throw-away cluster for the team setup, tests/reliability/postgres.py)
# and, for the browser tests of the Prefect UI, Debian's chromium (Playwright drives it; never
# `playwright install`). Set SKIP_CHROMIUM=1 to skip chromium.
# Installed with apt-get where we can (Debian/Ubuntu as root); otherwise named in a clear error.
set -euo pipefail
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
  || need+=(postgresql)
if [ -z "${SKIP_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then need+=(chromium); fi
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing system packages: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "merflow needs these system packages: ${need[*]}" >&2
  echo "install them with your package manager, e.g.: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
