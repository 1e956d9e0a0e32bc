#!/usr/bin/env bash
# Run the whole test suite. Installs what it needs first: Debian packages
# (MariaDB, RabbitMQ, the MariaDB client headers), the virtualenv and the
# Python packages, and starts MariaDB and RabbitMQ when they are stopped.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_api.py -x).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
apt_install build-essential pkg-config libmariadb-dev python3-dev curl
ensure_venv "[mysql,test]"
ensure_mariadb
ensure_rabbitmq
cd "$ROOT"
say "running the test suite"
exec "$VENV/bin/python" -m pytest -n 2 -p no:cacheprovider "$@"
