"""End to end: `twistd -n transferd` with backend = callback, and the real `twistd -n transferd-stager`.

Both are real processes on loopback; the tests submit as curl would, kill
and restart either side, and compare delivered bytes.  One test stands in
for the stager itself (a recording server in the test) so that it knows the
authcodes and can post bad callbacks to the real daemon.
"""

import filecmp
import json
import os
import shutil
import sqlite3
import subprocess
import time
import zlib

import treq
from twisted.internet import defer
from twisted.trial import unittest

from transferd import jobs, sample
from tests.daemon import TWISTD, Daemon, daemon_config, free_port
from tests.support import wait_for
from tests.test_callback_stager import Recorder, serve


class StagerDaemon(Daemon):
    """One `twistd -n transferd-stager` process serving workdir/archive; start() waits until it answers."""

    def __init__(self, workdir, port, *args):
        super().__init__(workdir, None, port, name=f"stager-{port}")
        self.args = args
        self.staging = os.path.join(workdir, "stager-staging")

    @defer.inlineCallbacks
    def start(self, timeout=30):
        self.starts += 1
        self.process = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", self.logfile, "transferd-stager",
             "--archive", os.path.join(self.workdir, "archive"), "--staging", self.staging,
             "--endpoint", f"tcp:{self.port}:interface=127.0.0.1", "--hostname", "stager.test", *self.args],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.logfile + ".stderr", "w"),
        )
        yield wait_for(self._answers, timeout, interval=0.1)

    @defer.inlineCallbacks
    def _answers(self):
        if self.process.poll() is not None:
            raise AssertionError(f"transferd-stager exited with {self.process.returncode}:\n{self.logs()[-3000:]}")
        try:
            response = yield treq.get(f"{self.url}/stage/{jobs.new_job_id()}", timeout=2, persistent=False)
            yield response.content()
            return response.code == 404
        except Exception:
            return False


def expected_files(archive, product_id):
    """The staged file list transferd should record for an archived product."""
    source = os.path.join(archive, product_id)
    paths = [source] if os.path.isfile(source) else sorted(
        os.path.join(directory, name) for directory, _, names in os.walk(source) for name in names)
    files = []
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read()
        relative = os.path.relpath(path, archive).replace(os.sep, "/")
        files.append({"path": relative, "size": len(data), "checksum": "adler32:%08x" % zlib.adler32(data)})
    return sorted(files, key=lambda f: f["path"])


class CallbackStagingTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        self.deliveries = os.path.join(self.workdir, "deliveries")
        self.archive = os.path.join(self.workdir, "archive")
        os.makedirs(self.deliveries)
        sample.create(self.archive)
        self.destination = "file://" + self.deliveries

    @defer.inlineCallbacks
    def start_stager(self, *args, port=None, start=True):
        stager = StagerDaemon(self.workdir, port or free_port(), *args)
        self.addCleanup(stager.stop)
        if start:
            yield stager.start()
        return stager

    @defer.inlineCallbacks
    def start_transferd(self, stager_url, **stager_settings):
        settings = {"backend": "callback", "url": stager_url, "timeout": "3", "retry_delay": "0.2",
                    "max_attempts": "3"}
        settings.update(stager_settings)
        port = free_port()
        daemon = Daemon(self.workdir, daemon_config(self.workdir, port, stager=settings), port)
        self.addCleanup(daemon.stop)
        yield daemon.start()
        return daemon

    def assertDelivered(self, product_id):
        source = os.path.join(self.archive, product_id)
        target = os.path.join(self.deliveries, product_id)
        if os.path.isdir(source):
            for root, _, files in os.walk(source):
                for name in files:
                    path = os.path.join(root, name)
                    self.assertTrue(filecmp.cmp(path, os.path.join(target, os.path.relpath(path, source)),
                                                shallow=False), path)
            self.assertEqual(expected_files(self.deliveries, product_id), expected_files(self.archive, product_id))
        else:
            self.assertTrue(filecmp.cmp(source, target, shallow=False))

    def held_for_the_stager(self, job_id):
        """True once transferd has handed the job to the stager: its lease is an ownerless hold (in the DB)."""
        with sqlite3.connect(os.path.join(self.workdir, "jobs.sqlite")) as db:
            row = db.execute("SELECT lease_owner, lease_until FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row is not None and row[0] is None and row[1] is not None and row[1] > time.time()

    # -- the tests --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_file_and_directory_products_delivered(self):
        """Through the reference stager a file and a directory product are delivered byte for byte, files recorded."""
        stager = yield self.start_stager("--delay", "0.2")
        daemon = yield self.start_transferd(stager.url + "/stage")
        job_ids = {}
        for product in ("sample-001", "sample-002"):
            job_ids[product] = yield daemon.submit(product, self.destination)
        views = yield daemon.wait_terminal(list(job_ids.values()), timeout=20)
        for product, job_id in job_ids.items():
            view = views[job_id]
            self.assertEqual(view["status"], jobs.SUCCESS, view)
            self.assertEqual((view["stage_attempts"], view["stager_hostname"]), (1, "stager.test"))
            staged = os.path.join(stager.staging, job_id, product)
            self.assertEqual(view.get("stager_path", staged), staged)  # shown until the copy is freed
            self.assertEqual(view["staged_files"], expected_files(self.archive, product))
            self.assertDelivered(product)
            # The job has ended: transferd told the stager (DELETE), which freed the staged copy.
            yield wait_for(lambda: not os.path.exists(os.path.join(stager.staging, job_id)))
        yield wait_for(lambda: f"job {job_ids['sample-002']}: transferd recorded the staging report (HTTP 200)"
                       in stager.logs())

    @defer.inlineCallbacks
    def test_failures_reported_by_the_stager(self):
        """A failure callback ends the job in ERROR with the stager's words; a cancel during the recall stops it."""
        stager = yield self.start_stager("--fail-products", "sample-002", "--delay", "1")
        daemon = yield self.start_transferd(stager.url + "/stage")
        failed = yield daemon.submit("sample-002", self.destination)
        missing = yield daemon.submit("no-such-product", self.destination)
        cancelled = yield daemon.submit("sample-001", self.destination)
        yield wait_for(lambda: self.held_for_the_stager(cancelled), 10)
        response = yield treq.post(daemon.url + "/cancelTransfer", data={"job_id": cancelled}, persistent=False)
        self.assertEqual(response.code, 200, (yield response.text()))
        views = yield daemon.wait_terminal([failed, missing, cancelled], timeout=20)
        self.assertEqual(views[failed]["status"], jobs.ERROR)
        self.assertEqual(views[failed]["detailed_status"],
                         "staging failed: staging of sample-002 failed: this stager was told to fail it "
                         "(--fail-products)")
        self.assertEqual((views[missing]["status"], views[missing]["detailed_status"]),
                         (jobs.ERROR, "staging failed: product 'no-such-product' is not in the archive"))
        self.assertEqual(views[cancelled]["status"], jobs.CANCELLED)
        yield wait_for(lambda: f"job {cancelled}: DELETE: work stopped" in stager.logs())
        yield wait_for(lambda: f"job {missing}: transferd recorded" in stager.logs())
        self.assertNotIn(f"job {cancelled}: staged", stager.logs())
        self.assertNotIn(f"job {cancelled}: transferd", stager.logs())

    @defer.inlineCallbacks
    def test_stager_down_then_started(self):
        """Jobs submitted while the stager is down wait, saying why, and are staged once it starts, in one attempt."""
        stager = yield self.start_stager(start=False)
        daemon = yield self.start_transferd(stager.url + "/stage", timeout="30")
        job_ids = []
        for product in ("sample-001", "sample-002"):
            job_ids.append((yield daemon.submit(product, self.destination)))

        @defer.inlineCallbacks
        def waiting():
            views = yield defer.gatherResults([daemon.status(job_id) for job_id in job_ids])
            return all((view.get("detailed_status") or "").startswith(f"waiting: the stager at {stager.url}/stage cannot be"
                                                          " reached: ") for view in views)

        yield wait_for(waiting, 10)
        yield stager.start()
        views = yield daemon.wait_terminal(job_ids, timeout=30)
        self.assertEqual({view["status"] for view in views.values()}, {jobs.SUCCESS}, views)
        self.assertEqual({view["stage_attempts"] for view in views.values()}, {1})
        self.assertDelivered("sample-001")
        self.assertDelivered("sample-002")

    @defer.inlineCallbacks
    def test_unreachable_stager_fails_the_job(self):
        """When the stager stays unreachable for give_up_after, the job ends in ERROR naming the outage."""
        url = f"http://127.0.0.1:{free_port()}/stage"
        daemon = yield self.start_transferd(url, give_up_after="2", retry_delay="0.2")
        job_id = yield daemon.submit("sample-001", self.destination)
        views = yield daemon.wait_terminal([job_id], timeout=20)
        self.assertEqual(views[job_id]["status"], jobs.ERROR)
        self.assertRegex(views[job_id]["detailed_status"],
                         rf"^staging failed: the stager at {url} cannot be reached: .*refused.*"
                         r" \(gave up after [23]s of trying\)$")
        self.assertEqual(views[job_id]["stage_attempts"], 0)

    @defer.inlineCallbacks
    def test_stager_timeout_restages_with_a_new_authcode(self):
        """A stager that loses a request (--drop-first 1) gets it again with a new authcode after the timeout."""
        stager = yield self.start_stager("--drop-first", "1")
        daemon = yield self.start_transferd(stager.url + "/stage", timeout="2")
        job_id = yield daemon.submit("sample-001", self.destination)
        views = yield daemon.wait_terminal([job_id], timeout=20)
        self.assertEqual((views[job_id]["status"], views[job_id]["stage_attempts"]), (jobs.SUCCESS, 2), views)
        self.assertIn(f"job {job_id} staging again (attempt 2)", daemon.logs())
        log = stager.logs()
        self.assertIn(f"job {job_id}: accepted sample-001 but dropped on purpose", log)
        self.assertIn(f"job {job_id}: asked again with a new authcode", log)
        self.assertDelivered("sample-001")

    @defer.inlineCallbacks
    def test_transferd_down_while_the_stager_calls_back(self):
        """When transferd is killed while the stager works, the stager's callback retries reach it once restarted."""
        stager = yield self.start_stager("--delay", "1", "--callback-retry", "0.2", "--callback-retry-max", "1")
        daemon = yield self.start_transferd(stager.url + "/stage", timeout="30")
        job_id = yield daemon.submit("sample-002", self.destination)
        yield wait_for(lambda: self.held_for_the_stager(job_id), 10)
        daemon.kill()
        yield wait_for(lambda: f"job {job_id}: callback attempt 1 failed" in stager.logs(), 10)
        yield daemon.start()
        views = yield daemon.wait_terminal([job_id], timeout=20)
        self.assertEqual((views[job_id]["status"], views[job_id]["stage_attempts"]), (jobs.SUCCESS, 1), views)
        self.assertDelivered("sample-002")
        yield wait_for(lambda: f"job {job_id}: transferd recorded the staging report" in stager.logs())

    @defer.inlineCallbacks
    def test_transferd_killed_before_it_heard_the_stager_accept(self):
        """transferd killed -9 after the stager accepted a staging but before the 202 reached it: restarted, it
        asks the stager about the attempt (GET), waits for its report, and never asks it to stage the job again."""
        # The stager answers POST /stage only after 60 s, but stages at once; its recall takes 8 s.
        stager = yield self.start_stager("--delay", "8", "--answer-after", "60", "--callback-retry", "0.2",
                                         "--callback-retry-max", "1")
        daemon = yield self.start_transferd(stager.url + "/stage", timeout="60")
        job_id = yield daemon.submit("sample-001", self.destination)
        yield wait_for(lambda: f"job {job_id}: accepted staging of sample-001" in stager.logs(), 10)
        daemon.kill()
        yield daemon.start()  # the dead worker's 2 s lease runs out; the reconciler re-drives the job
        views = yield daemon.wait_terminal([job_id], timeout=30)
        self.assertEqual((views[job_id]["status"], views[job_id]["stage_attempts"]), (jobs.SUCCESS, 1), views)
        self.assertIn(f"job {job_id}: the stager is still working on the attempt a stopped worker asked for",
                      daemon.logs())
        self.assertEqual(stager.logs().count(f"job {job_id}: accepted staging of"), 1)
        self.assertNotIn("asked again with a new authcode", stager.logs())
        self.assertDelivered("sample-001")

    @defer.inlineCallbacks
    def test_cancel_while_staging(self):
        """Cancelling a STAGING job sends the stager DELETE; a callback it sends anyway is refused with 403."""
        stager = yield self.start_stager("--delay", "1", "--ignore-cancel")
        daemon = yield self.start_transferd(stager.url + "/stage", timeout="30")
        job_id = yield daemon.submit("sample-001", self.destination)
        yield wait_for(lambda: self.held_for_the_stager(job_id), 10)
        response = yield treq.post(daemon.url + "/cancelTransfer", data={"job_id": job_id}, persistent=False)
        self.assertEqual(response.code, 200, (yield response.text()))
        yield wait_for(lambda: f"job {job_id}: DELETE ignored on purpose" in stager.logs(), 10)
        yield wait_for(lambda: f"job {job_id}: transferd refused the staging report (HTTP 403: " in stager.logs(), 10)
        self.assertIn("is no longer waiting for staging (CANCELLED)", stager.logs())
        view = yield daemon.status(job_id)
        self.assertEqual(view["status"], jobs.CANCELLED)
        self.assertNotIn("time_staged", view)
        # The refused copy is useless to anyone: the stager freed it.
        yield wait_for(lambda: not os.path.exists(os.path.join(stager.staging, job_id)))
        self.assertFalse(os.path.exists(os.path.join(self.deliveries, "sample-001")))


class BadCallbackTests(unittest.TestCase):
    """Bad /doneStaging reports posted to the real daemon never change a job.

    The test is the stager here: a recording server takes transferd's staging
    requests, so the test knows the authcodes transferd handed out.
    """

    timeout = 60

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        self.deliveries = os.path.join(self.workdir, "deliveries")
        os.makedirs(self.deliveries)
        sample.create(os.path.join(self.workdir, "archive"))

    @defer.inlineCallbacks
    def report(self, daemon, fields, form=False, raw=None):
        if raw is not None:
            response = yield treq.post(daemon.url + "/doneStaging", data=raw,
                                       headers={"Content-Type": "application/json"}, persistent=False)
        elif form:
            response = yield treq.post(daemon.url + "/doneStaging", data=fields, persistent=False)
        else:
            response = yield treq.post(daemon.url + "/doneStaging", json=fields, persistent=False)
        return response.code, (yield response.json())

    @defer.inlineCallbacks
    def test_bad_callbacks_change_nothing(self):
        """Wrong, replayed or superseded codes, mismatched products, malformed fields and huge bodies are refused."""
        stager = Recorder(default_code=202)
        served = serve(self, stager)
        port = free_port()
        daemon = Daemon(self.workdir, daemon_config(self.workdir, port, stager={
            "backend": "callback", "url": served.url + "/stage", "timeout": "4", "retry_delay": "0.2",
        }), port)
        self.addCleanup(daemon.stop)
        yield daemon.start()
        job_id = yield daemon.submit("sample-001", "file://" + self.deliveries)
        superseded = yield daemon.submit("sample-002", "file://" + self.deliveries)

        def requests_for(job):
            return [seen.body for seen in stager.of("POST") if seen.body["job_id"] == job]

        yield wait_for(lambda: requests_for(job_id) and requests_for(superseded), 10)
        authcode = requests_for(job_id)[0]["authcode"]
        self.assertEqual(requests_for(job_id)[0]["callback_url"], daemon.url + "/doneStaging")
        before = yield daemon.status(job_id)
        self.assertEqual(before["status"], jobs.STAGING)

        # A staged copy the test made itself, as a stager would have.
        staged = os.path.join(self.workdir, "my-staging", job_id, "sample-001")
        os.makedirs(os.path.dirname(staged))
        shutil.copy(os.path.join(self.workdir, "archive", "sample-001"), staged)
        good = {"job_id": job_id, "product_id": "sample-001", "authcode": authcode, "success": True,
                "staged_to": "stager.test", "path": staged, "msg": "staged by the test"}

        bad = [
            (dict(good, authcode="not-the-code"), 403, "not valid"),
            (dict(good, authcode=authcode + "x"), 403, "not valid"),
            (dict(good, authcode=None), 400, "authcode"),
            (dict(good, product_id="sample-002"), 400, "does not match"),
            (dict(good, job_id="not-a-job"), 400, "UUID"),
            (dict(good, job_id=jobs.new_job_id()), 404, "no job"),
            (dict(good, success="perhaps"), 400, "success"),
            (dict(good, path=None), 400, "staged_to and path"),
            (dict(good, files=[{"path": "../etc/passwd", "size": 1}]), 400, "relative path"),
            (dict(good, files=[{"path": "sample-001", "size": -5}]), 400, "whole numbers"),
            (dict(good, files="[not json"), 400, "files"),
            (dict(good, msg="m" * 5000), 400, "at most"),
        ]
        for fields, code, text in bad:
            answer = yield self.report(daemon, {k: v for k, v in fields.items() if v is not None})
            self.assertEqual((answer[0], answer[1]["error"]), (code, True), (fields, answer))
            self.assertIn(text, answer[1]["msg"])
        answer = yield self.report(daemon, dict(good, success="true", authcode="guess"), form=True)
        self.assertEqual(answer[0], 403)
        answer = yield self.report(daemon, None, raw=b'{"job_id": "' + job_id.encode() + b'", "msg": "'
                                   + b"x" * 70000 + b'"}')
        self.assertEqual(answer[0], 413)
        answer = yield self.report(daemon, None, raw=b"{not json")
        self.assertEqual(answer[0], 400)
        self.assertEqual((yield daemon.status(job_id)), before)

        # The right report is recorded; the used code cannot report anything else afterwards.
        answer = yield self.report(daemon, good)
        self.assertEqual(answer[0], 200, answer)
        views = yield daemon.wait_terminal([job_id], timeout=20)
        done = views[job_id]
        self.assertEqual((done["status"], done.get("stager_path", staged), done["stager_status"]),
                         (jobs.SUCCESS, staged, "staged by the test"))  # stager_path shown until the copy is freed
        for replay in (dict(good, success=False, msg="late failure"), dict(good, path=staged + "-other")):
            answer = yield self.report(daemon, replay)
            self.assertEqual(answer[0], 403, answer)
        answer = yield self.report(daemon, good)
        self.assertEqual((answer[0], answer[1]["msg"]), (200, "staging result already recorded"))
        self.assertEqual((yield daemon.status(job_id)), done)

        # The other job: nobody called back, so after the timeout transferd asks again with a new code.
        yield wait_for(lambda: len(requests_for(superseded)) == 2, 20)
        old, new = (request["authcode"] for request in requests_for(superseded))
        self.assertNotEqual(old, new)
        staged = os.path.join(self.workdir, "my-staging", superseded, "sample-002")
        shutil.copytree(os.path.join(self.workdir, "archive", "sample-002"), staged)
        report = {"job_id": superseded, "product_id": "sample-002", "success": True, "staged_to": "stager.test",
                  "path": staged, "files": json.dumps([{"path": "sample-002/README.txt"}])}
        before = yield daemon.status(superseded)
        answer = yield self.report(daemon, dict(report, authcode=old))
        self.assertEqual(answer[0], 403, answer)
        self.assertEqual((yield daemon.status(superseded)), before)
        answer = yield self.report(daemon, dict(report, authcode=new), form=True)
        self.assertEqual(answer[0], 200, answer)
        views = yield daemon.wait_terminal([superseded], timeout=20)
        self.assertEqual((views[superseded]["status"], views[superseded]["stage_attempts"]), (jobs.SUCCESS, 2))
        self.assertEqual(views[superseded]["staged_files"], [{"path": "sample-002/README.txt"}])
