#!/usr/bin/env bash
# Run the whole test suite. Installs what it needs first: Debian packages
# (MariaDB, RabbitMQ, the MariaDB client headers), the virtualenv and the
# Python packages, and starts MariaDB and RabbitMQ when they are stopped.
# With arguments, runs just pytest with them (e.g. scripts/test.sh tests/test_api.py -x).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# swig and libssl-dev build M2Crypto, needed by the official FTS3 client (PyPI fts3) the tests run;
# the openssl command checks the tests' certificate hashes and DNs against OpenSSL's own;
# tmux gives transferctl watch a real terminal to draw in (tests/test_cli_terminal.py);
# chromium is the browser Playwright drives in tests/test_dashboard_browser.py (never a downloaded one);
# haproxy is the load balancer in front of several daemons in tests/test_scaleout.py (conf/haproxy.cfg).
apt_install build-essential pkg-config libmariadb-dev python3-dev curl swig libssl-dev openssl tmux chromium chromium-driver haproxy
ensure_venv "[mysql,test]"
ensure_mariadb
ensure_rabbitmq
cd "$ROOT"
if [ $# -gt 0 ]; then
    exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
fi
# Three phases: everything that can share the machine runs in parallel; the
# outage tests (slow, mostly waiting, each with servers of its own) run side
# by side, one worker each; tests marked serial (they stop RabbitMQ's app)
# run alone afterwards.
say "running the test suite (parallel phase)"
"$VENV/bin/python" -m pytest -n 2 -p no:cacheprovider -m "not serial and not outage"
say "running the test suite (outage phase: servers killed and restarted)"
"$VENV/bin/python" -m pytest -n 4 -p no:cacheprovider -m outage
say "running the test suite (serial phase: broker restarts)"
"$VENV/bin/python" -m pytest -p no:cacheprovider -m serial
