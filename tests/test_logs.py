"""[log] format = json: one JSON object per line, from the real twistd (to --logfile and to standard output)."""

import json
import os
import subprocess
import time

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.daemon import TWISTD, Daemon, daemon_config, free_port
from transferd import jobs
from transferd.logs import JSONLineObserver, event_fields


class Lines:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass


class EventFieldsTests(unittest.SynchronousTestCase):
    def test_fields_as_keys(self):
        """An event's message is its text; its fields are keys; what is not JSON becomes its text."""
        out = Lines()
        log = Logger(namespace="transferd.pipeline", observer=JSONLineObserver(out))
        log.warn("job {job_id}: {error}", job_id="j-1", error=ValueError("stager away"), wait=1.5)
        (record,) = [json.loads(line) for line in out.text.splitlines()]
        self.assertEqual({key: record[key] for key in ("level", "namespace", "message", "job_id", "error", "wait")},
                         {"level": "warn", "namespace": "transferd.pipeline", "message": "job j-1: stager away",
                          "job_id": "j-1", "error": "stager away", "wait": 1.5})
        self.assertRegex(record["time"], r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")

    def test_failure_has_its_traceback(self):
        """A logged failure carries its traceback in one key, on the same single line."""
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            failure = Failure()
        record = event_fields({"log_format": "could not {what}", "what": "renew", "log_failure": failure,
                               "log_level": LogLevel.critical, "log_namespace": "x", "log_time": 0.0})
        self.assertEqual((record["message"], record["level"], record["time"]),
                         ("could not renew", "critical", "1970-01-01T00:00:00.000Z"))
        self.assertIn("RuntimeError: boom", record["traceback"])
        self.assertEqual(len(json.dumps(record).splitlines()), 1)


class TwistdJSONLogTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        for name in ("archive", "staging", "deliveries"):
            os.makedirs(os.path.join(self.workdir, name))
        with open(os.path.join(self.workdir, "archive", "product-1"), "wb") as handle:
            handle.write(b"some bytes\n")

    @defer.inlineCallbacks
    def test_logfile_lines_are_json(self):
        """Under twistd --logfile, every line of the log is one JSON object; a job's lines carry its job_id."""
        port = free_port()
        daemon = Daemon(self.workdir, daemon_config(self.workdir, port, log={"format": "json"}), port)
        self.addCleanup(daemon.stop)
        yield daemon.start()
        job_id = yield daemon.submit("product-1", "file://" + os.path.join(self.workdir, "deliveries"))
        views = yield daemon.wait_terminal([job_id])
        self.assertEqual(views[job_id]["status"], jobs.SUCCESS)
        daemon.stop()
        with open(daemon.logfile) as handle:
            lines = [line for line in handle.read().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
        for record in records:
            self.assertLessEqual({"time", "level", "namespace", "message"}, set(record), record)
        mine = [record for record in records if record.get("job_id") == job_id]
        success = [record for record in mine if record["message"].startswith(f"job {job_id} TRANSFERRING -> SUCCESS")]
        self.assertEqual([(record["level"], record["namespace"]) for record in success],
                         [("info", "transferd.store.sqlite.SQLiteJobStore")], mine)
        self.assertTrue(any(record["message"] == "transferd started" for record in records))
        self.assertTrue(any("Server Shut Down" in record["message"] for record in records))

    def test_stdout_lines_are_json(self):
        """twistd -n without --logfile writes the JSON lines to standard output."""
        port = free_port()
        config = daemon_config(self.workdir, port, log={"format": "json"})
        process = subprocess.Popen([TWISTD, "--pidfile=", "-n", "transferd", "--config", config], cwd=self.workdir,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "transferd started" in line:
                break
        process.terminate()
        rest, errors = process.communicate(timeout=20)
        lines += rest.splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        self.assertIn("transferd started", [record["message"] for record in records])
        self.assertEqual(errors, "")

    def test_text_stays_the_default(self):
        """Without [log] format the log is twistd's text, not JSON."""
        port = free_port()
        config = daemon_config(self.workdir, port)
        process = subprocess.Popen([TWISTD, "--pidfile=", "-n", "transferd", "--config", config], cwd=self.workdir,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        first = process.stdout.readline()
        process.terminate()
        process.communicate(timeout=20)
        self.assertRaises(ValueError, json.loads, first)
        self.assertRegex(first, r"\A\d{4}-\d\d-\d\dT\S+ \[\S+\] twistd ")  # twistd's "time [system] message" form

    def test_syslog_refused_with_json(self):
        """--syslog with [log] format = json stops start-up with one line saying why."""
        config = daemon_config(self.workdir, free_port(), log={"format": "json"})
        result = subprocess.run([TWISTD, "--pidfile=", "-n", "--syslog", "transferd", "--config", config],
                                cwd=self.workdir, capture_output=True, text=True, timeout=30)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        self.assertEqual(result.returncode, 1)
        self.assertEqual(lines, ["transferd: [log] format = json: JSON lines go to --logfile or standard output,"
                                 " not to syslog: drop --syslog"])
