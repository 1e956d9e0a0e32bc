#!/usr/bin/env bash
# Run transferd on its embedded defaults (SQLite, in-process queue, local stager
# and mover) with a small sample archive, listening on 127.0.0.1:8080.
# Installs what it needs first. Stop it with Ctrl-C.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
apt_install curl
ensure_venv ""
cd "$ROOT"
"$VENV/bin/python" -m transferd.sample transferd-data/archive
say "transferd on http://127.0.0.1:8080 (Ctrl-C stops it); try the curl lines in README.md"
exec "$VENV/bin/twistd" --pidfile= -n transferd --config conf/transferd.ini
