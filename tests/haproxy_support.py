"""A private haproxy (Debian's /usr/sbin/haproxy) in front of a test's daemons, configured from conf/haproxy.cfg.

The test runs the sample operators copy, not a config of its own: render()
keeps every section and setting of conf/haproxy.cfg and changes only what
a test must: the frontend and the stats page listen on the test's ports on
127.0.0.1, the backend's `server` lines are the test's daemons, the
health-check interval is short, and the lines that need root (chroot,
user, group, the admin socket) or a syslog go.  haproxy runs in the
foreground (-db) as the current user; stop() stops only that process.
"""

import csv
import io
import os
import re
import signal
import subprocess

import treq
from twisted.internet import defer, threads

from tests.daemon import free_port
from tests.support import wait_for

HAPROXY = "/usr/sbin/haproxy"
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "haproxy.cfg")
BACKEND = "transferd"  # the sample's backend (and frontend) name
ROOT_ONLY = ("chroot", "user", "group", "daemon", "stats socket", "log /dev/log")


def render(sample, port, stats_port, servers, inter="300ms", fall=None, rise=None):
    """The sample's text for a test: servers [(name, "host:port")], frontend on port, stats on stats_port.

    inter, fall and rise replace the default-server line's check timing (fall and rise only when given).
    Fails when the sample no longer has the parts a test relies on, rather than testing something else.
    """
    out, section, placed, seen = [], None, False, set()
    for line in sample.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if line and not line[0].isspace() and stripped:
            section = stripped
            out.append(line)
            if section == "global":
                out.append("    log stderr format raw local0 notice")  # server state changes, to our log file
            continue
        if section == "global" and stripped.startswith(ROOT_ONLY):
            continue
        if stripped.startswith("bind ") and section == f"frontend {BACKEND}":
            line = f"    bind 127.0.0.1:{port}"
            seen.add("frontend bind")
        elif stripped.startswith("bind ") and section == "listen stats":
            line = f"    bind 127.0.0.1:{stats_port}"
            seen.add("stats bind")
        elif section == f"backend {BACKEND}" and stripped.startswith("server "):
            if placed:
                continue
            placed = True
            out.extend(f"    server {name} {address}" for name, address in servers)
            continue
        elif section == f"backend {BACKEND}" and stripped.startswith("default-server "):
            line = re.sub(r"\binter \S+", f"inter {inter}", line)
            if fall is not None:
                line = re.sub(r"\bfall \d+", f"fall {fall}", line)
            if rise is not None:
                line = re.sub(r"\brise \d+", f"rise {rise}", line)
            seen.add("default-server")
        elif section == f"backend {BACKEND}" and stripped == "option httpchk GET /readyz":
            seen.add("httpchk")
        out.append(line)
    missing = {"frontend bind", "stats bind", "default-server", "httpchk"} - seen
    if missing or not placed:
        raise AssertionError(f"conf/haproxy.cfg has lost what the tests rely on: {sorted(missing) or 'server lines'}")
    return "\n".join(out) + "\n"


class HAProxy:
    """haproxy in front of servers [(name, url)]; start() waits until its frontend and stats page answer."""

    def __init__(self, testcase, workdir, servers, **timing):
        self.workdir = workdir
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats_url = f"http://127.0.0.1:{self.stats_port}/"
        self.config = os.path.join(workdir, "haproxy.cfg")
        self.logfile = os.path.join(workdir, "haproxy.log")
        addresses = [(name, url.split("://", 1)[1].rstrip("/")) for name, url in servers]
        with open(SAMPLE) as handle:
            text = render(handle.read(), self.port, self.stats_port, addresses, **timing)
        with open(self.config, "w") as handle:
            handle.write(text)
        self.process = None
        testcase.addCleanup(self.stop)

    def output(self):
        with open(self.logfile, errors="replace") as handle:
            return handle.read()

    @defer.inlineCallbacks
    def start(self, timeout=20):
        checked = yield threads.deferToThread(subprocess.run, [HAPROXY, "-c", "-f", self.config],
                                              capture_output=True, text=True)
        if checked.returncode != 0:
            raise AssertionError(f"haproxy refuses {self.config} ({checked.returncode}):\n"
                                 f"{checked.stdout}{checked.stderr}")
        with open(self.logfile, "w") as log:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", self.config], cwd=self.workdir,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        yield wait_for(self._answers, timeout, interval=0.1)

    @defer.inlineCallbacks
    def _answers(self):
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{self.output()[-3000:]}")
        try:
            yield self.servers()
            return True
        except Exception:
            return False

    @defer.inlineCallbacks
    def servers(self):
        """{server name: status} of the backend, from the stats page's CSV ("UP", "DOWN", "UP 1/2"...)."""
        response = yield treq.get(self.stats_url + ";csv", timeout=5, persistent=False)
        text = (yield response.text()).lstrip("# ")
        if response.code != 200:
            raise AssertionError(f"haproxy's stats page answered {response.code}: {text[:500]}")
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")}

    def stop(self, timeout=10):
        """SIGTERM this haproxy (only it), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
