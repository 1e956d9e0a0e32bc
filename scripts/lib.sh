# Shared set-up steps for scripts/demo.sh and scripts/test.sh (sourced, not run).
# Each step installs what is missing and leaves what is there alone.

set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
APT_UPDATED=0

say() { printf '==> %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    # apt_install PACKAGE... : install the Debian packages that are not installed yet.
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    if [ "$APT_UPDATED" = 0 ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_venv() {
    # ensure_venv EXTRAS : a virtualenv in .venv with transferd installed (editable) plus EXTRAS.
    local extras=$1
    command -v python3 >/dev/null || apt_install python3
    if [ ! -x "$VENV/bin/python" ]; then
        # python3-venv brings ensurepip; ca-certificates lets pip verify PyPI
        apt_install python3-venv ca-certificates
        python3 -m venv "$VENV"
    fi
    say "installing transferd${extras} into .venv"
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
    if ! "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT$extras" >"$VENV/pip-install.log" 2>&1; then
        cat "$VENV/pip-install.log" >&2
        echo "pip could not install transferd (log above, also in .venv/pip-install.log)" >&2
        exit 1
    fi
    plugin_path "$VENV"
}

plugin_path() {
    # plugin_path VENV : let the venv's twistd find the checkout's twisted/plugins.
    # An editable install maps the transferd package only; twistd looks for
    # plugins in every sys.path entry's twisted/plugins directory, so a .pth
    # adds a directory whose twisted/plugins is a link to the checkout's.
    local venv=$1 site
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$venv/transferd-plugins/twisted"
    ln -sfn "$ROOT/twisted/plugins" "$venv/transferd-plugins/twisted/plugins"
    echo "$venv/transferd-plugins" >"$site/transferd-plugins.pth"
    # Regenerate Twisted's plugin cache so twistd finds 'transferd' at once.
    "$venv/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
}

wait_port() {
    # wait_port PORT SECONDS : wait until something listens on 127.0.0.1:PORT.
    local port=$1 seconds=$2
    for _ in $(seq "$((seconds * 2))"); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.5
    done
    echo "nothing listens on 127.0.0.1:$port after ${seconds}s" >&2
    return 1
}

start_logged() {
    # start_logged NAME LOG PORT SECONDS COMMAND... : start a server in the background, its output
    # in LOG, and wait until it listens on PORT; if it exits or stays silent, show its output and stop.
    local name=$1 log=$2 port=$3 seconds=$4 pid
    shift 4
    say "starting $name (output in $log)"
    : >"$log"
    as_root nohup "$@" >>"$log" 2>&1 </dev/null &
    pid=$!
    for _ in $(seq "$((seconds * 2))"); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited before listening on 127.0.0.1:$port; its output ($log):" >&2
            tail -n 40 "$log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "$name does not listen on 127.0.0.1:$port after ${seconds}s; its output ($log):" >&2
    tail -n 40 "$log" >&2
    exit 1
}

ensure_mariadb() {
    # MariaDB on 127.0.0.1:3306 with root and an empty password, database 'test'.
    [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
    apt_install mariadb-client
    if ! (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null; then
        as_root install -d -o mysql -g mysql /run/mysqld
        # mariadbd refuses to run as root: it runs as the mysql user Debian's package made.
        start_logged MariaDB /tmp/transferd-mariadb.log 3306 60 /usr/sbin/mariadbd --user=mysql
    fi
    if ! mariadb -h127.0.0.1 -uroot -e "SELECT 1" >/dev/null 2>&1; then
        # A fresh Debian install lets root in only through the socket: allow the empty TCP password tests use.
        say "allowing root@127.0.0.1 with an empty password (test machine)"
        as_root mariadb -uroot -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('');"
    fi
    mariadb -h127.0.0.1 -uroot -e "CREATE DATABASE IF NOT EXISTS test" >/dev/null
}

ensure_rabbitmq() {
    # RabbitMQ on 127.0.0.1:5672 with guest/guest.
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    if ! as_root rabbitmqctl -q status >/dev/null 2>&1; then
        # Debian's rabbitmq-server runs the node as the rabbitmq user; in the foreground its errors reach the log.
        start_logged RabbitMQ /tmp/transferd-rabbitmq.log 5672 120 rabbitmq-server
    fi
    # The app may have been stopped (rabbitmqctl stop_app) while the node runs.
    if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
        as_root rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || true
        as_root rabbitmqctl -q start_app >/dev/null 2>&1 || true
    fi
    wait_port 5672 120
}
