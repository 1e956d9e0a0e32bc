"""A MariaDB server and a RabbitMQ node of a test's own, to kill with -9 and start again.

The shared servers (tests/mysql_support.py, tests/amqp_support.py) are never
stopped; a test that takes a server down starts one of these: its own data
directory, ports and node name, started the way an operator would
(`mariadb-install-db` then `mariadbd --user=mysql`; `rabbitmq-server`), and
killed and removed at cleanup.  Data directories live under /tmp (not the
test's 0700 temporary directory), owned by the server's user.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

import MySQLdb
from twisted.internet import defer, threads

from tests.daemon import free_port
from tests.support import wait_for


def _owned_directory(prefix, user):
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    shutil.chown(path, user, user)
    return path


class _Server:
    """One server process in its own session (so kill() reaches all of it); cleanup kills it and removes its files."""

    name = "server"

    def __init__(self, testcase, base):
        self.base = base
        self.process = None
        self.starts = 0
        testcase.addCleanup(self._remove)

    def _spawn(self, argv, env=None, user=None):
        self.starts += 1
        log = open(os.path.join(self.base, f"{self.name}-{self.starts}.out"), "w")
        self.process = subprocess.Popen(argv, env=env, cwd=self.base, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, user=user, group=user,
                                        extra_groups=[] if user else None)
        log.close()

    def _pids(self):
        """Processes to kill besides the session: those that put themselves in a session of their own."""
        return []

    @defer.inlineCallbacks
    def kill(self):
        """kill -9 of the whole server (every process of its session); fires once it listens no more."""
        if self.process is None:
            return
        for kill, pid in [(os.kill, pid) for pid in self._pids()] + [(os.killpg, self.process.pid)]:
            try:
                kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        yield threads.deferToThread(self.process.wait)
        yield wait_for(lambda: not _accepts(self.port), 10, interval=0.05)  # the session's other processes too

    def output(self):
        """What the server printed, every start (for failure messages)."""
        text = []
        for start in range(1, self.starts + 1):
            with open(os.path.join(self.base, f"{self.name}-{start}.out"), errors="replace") as handle:
                text.append(handle.read()[-3000:])
        return "\n".join(text)

    @defer.inlineCallbacks
    def _wait_until(self, ready, timeout):
        def check():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")
            return ready()

        yield wait_for(check, timeout, interval=0.1)

    @defer.inlineCallbacks
    def _remove(self):
        yield self.kill()
        shutil.rmtree(self.base, ignore_errors=True)


def _accepts(port):
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class PrivateMariaDB(_Server):
    """mariadbd on 127.0.0.1:<port> with its own data directory; root without a password."""

    name = "mariadbd"

    def __init__(self, testcase):
        super().__init__(testcase, _owned_directory("transferd-mariadb-", "mysql"))
        self.port = free_port()
        self.datadir = os.path.join(self.base, "data")
        self.tmpdir = os.path.join(self.base, "tmp")  # not /tmp: servers starting together name temporary tables alike
        os.makedirs(self.tmpdir)
        shutil.chown(self.tmpdir, "mysql", "mysql")
        installed = subprocess.run(
            ["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={self.datadir}",
             f"--tmpdir={self.tmpdir}", "--auth-root-authentication-method=normal", "--skip-test-db"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.base, text=True)
        if installed.returncode != 0:
            raise AssertionError(f"mariadb-install-db failed ({installed.returncode}):\n{installed.stdout[-3000:]}")

    def url(self, database):
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    @defer.inlineCallbacks
    def start(self, timeout=60):
        """Start mariadbd (again: InnoDB recovers what was committed) and wait until it answers."""
        self._spawn([
            "mariadbd", "--no-defaults", "--user=mysql", f"--datadir={self.datadir}", f"--tmpdir={self.tmpdir}",
            f"--port={self.port}",
            f"--socket={os.path.join(self.base, 'mariadbd.sock')}", "--bind-address=127.0.0.1",
            f"--pid-file={os.path.join(self.base, 'mariadbd.pid')}", "--skip-log-bin",
            "--innodb-buffer-pool-size=32M", "--max-connections=200",
        ])
        yield self._wait_until(self._answers, timeout)

    def _answers(self):
        try:
            self.execute("SELECT 1")
            return True
        except MySQLdb.OperationalError:
            return False

    def execute(self, statement):
        connection = MySQLdb.connect(host="127.0.0.1", port=self.port, user="root", password="",
                                     connect_timeout=2, autocommit=True)
        try:
            cursor = connection.cursor()
            cursor.execute(statement)
            return cursor.fetchall()
        finally:
            connection.close()


class PrivateRabbitMQ(_Server):
    """A RabbitMQ node of its own (name, ports, Mnesia and log directories) on 127.0.0.1:<port>, guest/guest."""

    name = "rabbitmq-server"

    def __init__(self, testcase):
        super().__init__(testcase, _owned_directory("transferd-rabbitmq-", "rabbitmq"))
        self.port = free_port()
        files = {
            "rabbitmq.conf": f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n",
            "rabbitmq-env.conf": "",  # instead of /etc/rabbitmq's, which names the shared node
            "enabled_plugins": "[].\n",
        }
        for name, text in files.items():
            with open(os.path.join(self.base, name), "w") as handle:
                handle.write(text)
        for name in ("mnesia", "log"):
            os.makedirs(os.path.join(self.base, name))
        for directory, _, names in os.walk(self.base):
            for name in [directory, *(os.path.join(directory, n) for n in names)]:
                shutil.chown(name, "rabbitmq", "rabbitmq")
        self.env = dict(
            os.environ,
            RABBITMQ_NODENAME=f"transferd-test-{self.port}@localhost",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(free_port()),
            RABBITMQ_CONFIG_FILE=os.path.join(self.base, "rabbitmq.conf"),
            RABBITMQ_CONF_ENV_FILE=os.path.join(self.base, "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.base, "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=os.path.join(self.base, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(self.base, "log"),
            RABBITMQ_PID_FILE=os.path.join(self.base, "rabbitmq.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            HOME="/var/lib/rabbitmq",  # the Erlang cookie
        )

    def _pids(self):
        """The Erlang VM, from the pid file the node writes."""
        try:
            with open(self.env["RABBITMQ_PID_FILE"]) as handle:
                return [int(handle.read().strip())]
        except (OSError, ValueError):
            return []

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @defer.inlineCallbacks
    def start(self, timeout=90):
        """Start the node (again: durable queues and persistent messages come back) and wait for its listener."""
        started = time.monotonic()
        # The server script itself, as the rabbitmq user (Debian's /usr/sbin wrapper would su to it,
        # leaving the Erlang VM outside our session, and send its output to the shared node's log).
        self._spawn(["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=self.env, user="rabbitmq")
        yield self._wait_until(lambda: _accepts(self.port), timeout)
        return time.monotonic() - started
