"""Run the real `twistd -n transferd` as a subprocess for end-to-end and fault tests."""

import glob
import os
import signal
import socket
import subprocess
import sys

import treq
from twisted.internet import defer

from transferd import jobs
from tests.support import wait_for

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path, sections):
    """Write an INI file from {section: {key: value}}."""
    with open(path, "w") as handle:
        for section, values in sections.items():
            handle.write(f"[{section}]\n")
            for key, value in values.items():
                handle.write(f"{key} = {value}\n")
            handle.write("\n")


def daemon_config(workdir, port, **overrides):
    """Write workdir/transferd-<port>.ini: the embedded set-up under workdir, with per-section overrides.

    workdir holds archive/, staging/, deliveries/ and jobs.sqlite; timers are
    short so tests see re-drives within a second or two.
    """
    sections = {
        "api": {"endpoint": f"tcp:{port}:interface=127.0.0.1", "public_url": f"http://127.0.0.1:{port}"},
        "database": {"url": "sqlite:///" + os.path.join(workdir, "jobs.sqlite")},
        "stager": {"archive_root": os.path.join(workdir, "archive"), "staging_root": os.path.join(workdir, "staging")},
        "transfer": {"file_roots": os.path.join(workdir, "deliveries")},
        "reconciler": {"interval": "0.5", "lease": "2"},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    path = os.path.join(workdir, f"transferd-{port}.ini")
    write_config(path, sections)
    return path


class Daemon:
    """One transferd process; start() waits until its API answers."""

    def __init__(self, workdir, config_path, port, name="transferd"):
        self.workdir = workdir
        self.config_path = config_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.name = name
        self.process = None
        self.starts = 0
        self.command = [TWISTD]  # what runs twistd (tests/crashing_twistd.py, for one)
        self.options = []  # more `twistd transferd` options, after --config

    @property
    def logfile(self):
        return os.path.join(self.workdir, f"{self.name}-{self.starts}.log")

    @defer.inlineCallbacks
    def start(self, timeout=30):
        self.launch()
        yield wait_for(self._answers, timeout, interval=0.1)

    def launch(self):
        """Start the process without waiting for it (tests without a reactor wait in their own way)."""
        self.starts += 1
        self.process = subprocess.Popen(
            [*self.command, "--pidfile=", "-n", "--logfile", self.logfile, "transferd", "--config", self.config_path,
             *self.options],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.logfile + ".stderr", "w"),
        )

    @defer.inlineCallbacks
    def _answers(self):
        if self.process.poll() is not None:
            raise AssertionError(f"transferd exited with {self.process.returncode}:\n{self.logs()[-3000:]}")
        try:
            response = yield treq.get(self.url + "/transferStatus?job_id=" + jobs.new_job_id(), timeout=2, persistent=False)
            yield response.content()
            return response.code == 404
        except Exception:
            return False

    def kill(self):
        """kill -9: no clean-up of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout=20):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self):
        """Every log line this daemon wrote, across restarts."""
        text = []
        for start in range(1, self.starts + 1):
            log = os.path.join(self.workdir, f"{self.name}-{start}.log")
            rotated = sorted(glob.glob(glob.escape(log) + ".[0-9]*"), key=lambda path: -int(path.rsplit(".", 1)[1]))
            for path in [*rotated, log, log + ".stderr"]:  # twistd rotates its log every megabyte: oldest first
                if os.path.exists(path):
                    with open(path, errors="replace") as handle:
                        text.append(handle.read())
        return "\n".join(text)

    # -- the API, as curl would use it ------------------------------------------

    @defer.inlineCallbacks
    def submit(self, product_id, destination):
        response = yield treq.post(
            self.url + "/submitTransfer",
            data={"product_id": product_id, "destination_path": destination},
            timeout=10, persistent=False,
        )
        body = yield response.json()
        if response.code != 202:
            raise AssertionError(f"submit answered {response.code}: {body}")
        return body["job_id"]

    @defer.inlineCallbacks
    def status(self, job_id):
        response = yield treq.get(self.url + "/transferStatus", params={"job_id": job_id}, timeout=10, persistent=False)
        return (yield response.json())

    @defer.inlineCallbacks
    def wait_terminal(self, job_ids, timeout=60):
        """Poll until every job has ended; return {job_id: status view}."""
        views = {}

        @defer.inlineCallbacks
        def all_done():
            for job_id in job_ids:
                if job_id not in views or views[job_id]["status"] not in jobs.TERMINAL:
                    views[job_id] = yield self.status(job_id)
            return all(view["status"] in jobs.TERMINAL for view in views.values())

        try:
            yield wait_for(all_done, timeout, interval=0.2)
        except AssertionError:
            stuck = [view for view in views.values() if view["status"] not in jobs.TERMINAL]
            states = sorted({view["status"] for view in stuck})
            raise AssertionError(
                f"{len(stuck)} job(s) still in {states} after {timeout}s; first: {stuck[:1]}"
            ) from None
        return views
