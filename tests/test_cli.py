"""transferctl, the installed console script, against the real daemon over HTTP.

Two daemons per module, both the embedded set-up with the local stager: a
quick one (staging takes a second, so a job is seen moving) and a slow one
(staging takes minutes, so jobs stay active to be listed, cancelled and
timed out on). Every command runs as a subprocess, as a person or a script
would run it.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from tests.daemon import Daemon, daemon_config, free_port
from transferd import sample
from transferd.cli import errors

TRANSFERCTL = os.path.join(os.path.dirname(sys.executable), "transferctl")


def cli_env(tmp_path, **extra):
    """An environment with none of the credentials of whoever runs the tests (fresh HOME and XDG_RUNTIME_DIR)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "LANG": "C.UTF-8"}
    env.update(extra)
    return env


class CLI:
    """transferctl with a fixed environment; each call is (exit code, stdout, stderr)."""

    def __init__(self, env):
        self.env = env

    def __call__(self, *args, stdin=None, timeout=60):
        result = subprocess.run([TRANSFERCTL, *args], env=self.env, input=stdin, capture_output=True, text=True,
                                timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL)
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, result.stdout, result.stderr

    def ok(self, *args, **kwargs):
        code, out, err = self(*args, **kwargs)
        assert code == 0, (args, code, out, err)
        return out

    def json_lines(self, *args, **kwargs):
        return [json.loads(line) for line in self.ok(*args, "--json", **kwargs).splitlines()]


def wait_answering(daemon, url, verify=True, timeout=30):
    """Wait until the daemon answers HTTP at url (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise AssertionError(f"transferd exited with {daemon.process.returncode}:\n{daemon.logs()[-3000:]}")
        try:
            requests.get(url + "/api/v1/whoami", timeout=2, verify=verify)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise AssertionError(f"transferd did not answer at {url} within {timeout} s")


def start_daemon(workdir, tls_ca=None, **sections):
    """A real twistd transferd (embedded set-up under workdir, sample products in its archive), answering.

    With tls_ca (the CA file of [api] tls_cert), its url is https://localhost:PORT.
    """
    os.makedirs(os.path.join(workdir, "deliveries"), exist_ok=True)
    sample.create(os.path.join(workdir, "archive"))
    port = free_port()
    daemon = Daemon(workdir, daemon_config(workdir, port, **sections), port)
    if tls_ca:
        daemon.url = f"https://localhost:{port}"
    daemon.launch()
    try:
        wait_answering(daemon, daemon.url, verify=tls_ca or True)
    except AssertionError:
        daemon.stop()
        raise
    return daemon


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("quick"))
    daemon = start_daemon(workdir, stager={"delay": "1"})
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("slow"))
    daemon = start_daemon(workdir, stager={"delay": "300"})
    yield daemon
    daemon.kill()  # its jobs would stage for minutes: nothing of them is worth a clean stop


@pytest.fixture
def cli(quick, tmp_path):
    return CLI(cli_env(tmp_path, TRANSFERD_URL=quick.url))


@pytest.fixture
def slow_cli(slow, tmp_path):
    return CLI(cli_env(tmp_path, TRANSFERD_URL=slow.url))


def destination(daemon):
    return "file://" + os.path.join(daemon.workdir, "deliveries", uuid.uuid4().hex)


def csv_jobs(daemon, products, label):
    return "product_id,destination_path,label\n" + "".join(f"{p},{destination(daemon)},{label}\n" for p in products)


def test_submit_then_status(cli, quick):
    """When one product is submitted, its job id is printed alone, and status shows the job by that id."""
    dest = destination(quick)
    job_id = cli.ok("submit", "sample-001", dest, "--priority", "4", "--label", "one", "--metadata",
                    '{"proposal": "SCI-1"}').strip()
    assert len(job_id) == 36
    out = cli.ok("status", job_id)
    assert out.splitlines()[0].split()[0] == job_id
    assert f"destination     {dest}" in out
    [view] = cli.json_lines("status", job_id)
    assert (view["job_id"], view["product_id"], view["destination_path"], view["priority"], view["label"],
            view["metadata"]) == (job_id, "sample-001", dest, 4, "one", {"proposal": "SCI-1"})


def test_submit_wait_plain_lines(cli, quick):
    """When submit --wait writes to a pipe, it prints the job id, a line per change and a tally, then exits 0."""
    dest = destination(quick)
    code, out, err = cli("submit", "sample-001", dest, "--wait", "--interval", "0.2")
    assert code == errors.OK, err
    lines = out.splitlines()
    job_id = lines[0]
    states = [line.split()[2] for line in lines[1:-1]]
    assert all(line.split()[1] == job_id for line in lines[1:-1])
    assert states[-1] == "SUCCESS" and "STAGING" in states, lines
    assert lines[-1] == "1 job: 1 SUCCESS"
    assert os.path.exists(os.path.join(dest[len("file://"):], "sample-001"))


def test_submit_file_in_batches(slow_cli, slow):
    """When a CSV on stdin is sent in batches, every good row gets a job, and a bad row is refused by line number."""
    label = uuid.uuid4().hex
    products = ["sample-001"] * 12 + ["no-such-product"] + ["sample-002"] * 12
    code, out, err = slow_cli("submit", "--file", "-", "--batch-size", "10", stdin=csv_jobs(slow, products, label))
    assert code == errors.REFUSED, err
    job_ids = out.split()
    assert len(job_ids) == 24
    assert "line 14 (no-such-product) refused: 404" in err
    assert "submitted 24 of 25 jobs; 1 refused" in err
    listed = slow_cli.json_lines("list", "--label", label)
    assert sorted(view["job_id"] for view in listed) == sorted(job_ids)
    rows = slow_cli.ok("list", "--label", label, "--limit", "5").splitlines()
    assert rows[0].split()[:3] == ["JOB", "STATUS", "SUBMITTED"] and len(rows) == 6


def test_submit_json_lines(slow_cli, slow, tmp_path):
    """When the file is JSON lines, each line's fields reach its job, and --json prints one result per item."""
    path = tmp_path / "jobs.jsonl"
    label = uuid.uuid4().hex
    path.write_text("\n".join(json.dumps({"product_id": "sample-001", "destination_path": destination(slow),
                                          "priority": priority, "metadata": {"n": priority}})
                              for priority in (1, 5)) + "\n\n")
    results = slow_cli.json_lines("submit", "--file", str(path), "--label", label)
    assert [(r["index"], r["line"], r["product_id"]) for r in results] == [(0, 1, "sample-001"), (1, 2, "sample-001")]
    views = slow_cli.json_lines("status", *(r["job_id"] for r in results))
    assert [(v["priority"], v["metadata"], v["label"]) for v in views] == [(1, {"n": 1}, label), (5, {"n": 5}, label)]


def test_list_follows_the_cursor(slow_cli, slow):
    """When more jobs match than one page holds, list follows the cursor to --limit, newest first, none twice."""
    label = uuid.uuid4().hex
    slow_cli.ok("submit", "--file", "-", stdin=csv_jobs(slow, ["sample-001"] * 1100, label), timeout=120)
    views = slow_cli.json_lines("list", "--label", label, "--limit", "1050")
    assert len({view["job_id"] for view in views}) == len(views) == 1050
    keys = [(view["time_submitted"], view["job_id"]) for view in views]
    assert keys == sorted(keys, reverse=True)
    everything = slow_cli.json_lines("list", "--label", label, "--all")
    assert len({view["job_id"] for view in everything}) == 1100


def test_list_filters(slow_cli, slow):
    """When list is given a status (in any case), a product and an age, only the jobs matching all are shown."""
    label = uuid.uuid4().hex
    slow_cli.ok("submit", "--file", "-", stdin=csv_jobs(slow, ["sample-001", "sample-002"], label))
    views = slow_cli.json_lines("list", "--label", label, "--product", "sample-002", "--status", "submitted,staging",
                                "--since", "10m")
    assert [view["product_id"] for view in views] == ["sample-002"]
    assert slow_cli.json_lines("list", "--label", label, "--status", "SUCCESS") == []
    assert slow_cli.json_lines("list", "--label", label, "--until", "1h") == []


def test_history(cli, quick):
    """When a job has succeeded, history shows each state change in order, as text and as JSON lines."""
    job_id = cli.ok("submit", "sample-001", destination(quick), "--wait", "--interval", "0.2").split()[0]
    events = cli.json_lines("history", job_id)
    changes = [event["new_status"] for event in events if event.get("new_status")]
    assert changes[-4:] == ["STAGING", "STAGED", "TRANSFERRING", "SUCCESS"]
    text = cli.ok("history", job_id)
    assert "TRANSFERRING -> SUCCESS" in text.splitlines()[-1]


def test_cancel_by_id_and_by_filter(slow_cli, slow):
    """When jobs are cancelled by id and by filter, each is cancelled once; cancelling an ended job exits 4."""
    label = uuid.uuid4().hex
    first, second, third = slow_cli.ok("submit", "--file", "-", stdin=csv_jobs(slow, ["sample-001"] * 3, label)).split()
    assert slow_cli.ok("cancel", first).split() == [first]
    code, out, err = slow_cli("cancel", first)
    assert (code, out) == (errors.REFUSED, "")
    assert err.startswith(f"transferctl: {first}: 409") and err.count("\n") == 1
    code, out, err = slow_cli("cancel", "--label", label, "--status", "submitted,staging,staged")
    assert code == 0, err
    assert sorted(out.split()) == sorted([second, third]) and "cancelled 2 job(s)" in err
    [answer] = slow_cli.json_lines("cancel", "--label", label, "--status", "STAGING")
    assert answer["cancelled"] == 0
    assert {view["status"] for view in slow_cli.json_lines("status", first, second, third)} == {"CANCELLED"}


def test_watch_exit_codes(slow_cli, slow):
    """When a watched job is cancelled, watch exits 1; when --timeout passes first, 2; an unknown job, 4."""
    job_id = slow_cli.ok("submit", "sample-001", destination(slow)).strip()
    code, out, err = slow_cli("watch", job_id, "--timeout", "0.5", "--interval", "0.2")
    assert code == errors.TIMED_OUT
    assert err == "transferctl: timed out after 0.5 s: 1 of 1 job(s) have not ended\n"
    watcher = subprocess.Popen([TRANSFERCTL, "watch", job_id, "--interval", "0.2", "--json"], env=slow_cli.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    slow_cli.ok("cancel", job_id)
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == errors.JOBS_FAILED, err
    assert json.loads(out.splitlines()[-1])["status"] == "CANCELLED"
    code, out, err = slow_cli("watch", str(uuid.uuid4()))
    assert code == errors.REFUSED and "404" in err


def test_watch_json_until_success(cli, quick):
    """When watch --json follows two jobs, every line is a job view and each job's last line is SUCCESS."""
    job_ids = [cli.ok("submit", product, destination(quick)).strip() for product in ("sample-001", "sample-002")]
    views = cli.json_lines("watch", *job_ids, "--interval", "0.2")
    last = {view["job_id"]: view["status"] for view in views}
    assert last == {job_id: "SUCCESS" for job_id in job_ids}


def test_whoami_anonymous(cli, quick, tmp_path):
    """When the daemon does not authenticate, whoami says so; --url replaces TRANSFERD_URL."""
    [answer] = cli.json_lines("whoami")
    assert (answer["identity"], answer["admin"], answer["presented"]) == (None, True, "no credential")
    other = CLI(cli_env(tmp_path, TRANSFERD_URL="http://127.0.0.1:1"))
    assert "anonymous" in other.ok("whoami", "--url", quick.url)


def test_error_lines(cli, quick):
    """When a request cannot succeed, transferctl prints one line saying why and exits with the documented code."""
    cases = [
        (["status", str(uuid.uuid4())], errors.REFUSED, "404"),
        (["submit", "sample-001", destination(quick), "--priority", "9"], errors.REFUSED, "priority"),
        (["submit", "sample-001", "ftp://example.org/x"], errors.REFUSED, "ftp"),
        (["submit", "sample-001", destination(quick), "--metadata", "[1]"], errors.USAGE, "JSON object"),
        (["submit", "sample-001"], errors.USAGE, "PRODUCT and DEST"),
        (["cancel"], errors.USAGE, "--status STAGING"),
        (["list", "--since", "last week"], errors.USAGE, "--since"),
        (["frobnicate"], errors.USAGE, "No such command"),
        (["whoami", "--url", f"http://127.0.0.1:{free_port()}"], errors.UNREACHABLE, "cannot reach transferd"),
    ]
    for args, expected, words in cases:
        code, out, err = cli(*args)
        assert (code, out) == (expected, ""), (args, code, out, err)
        assert err.count("\n") == 1 and words in err, (args, err)


class AnswerDropper:
    """A TCP relay to the daemon that swallows the first answer and closes that connection: a lost answer."""

    def __init__(self, port):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target))
            drop = self.connections == 1
            threading.Thread(target=self.pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self.pipe, args=(upstream, client, drop), daemon=True).start()

    def pipe(self, source, sink, drop):
        try:
            while True:
                data = source.recv(65536)
                if not data or drop:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        self.listener.close()


def test_lost_answer_creates_nothing_twice(slow_cli, slow):
    """When the answer to a batch is lost, transferctl sends it again with its submission id: no job twice."""
    relay = AnswerDropper(slow.port)
    try:
        label = uuid.uuid4().hex
        job_ids = slow_cli.ok("submit", "--file", "-", "--url", relay.url,
                              stdin=csv_jobs(slow, ["sample-001"] * 5, label)).split()
    finally:
        relay.close()
    assert relay.connections == 2
    listed = slow_cli.json_lines("list", "--label", label)
    assert sorted(view["job_id"] for view in listed) == sorted(job_ids) and len(job_ids) == 5
