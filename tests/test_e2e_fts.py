"""End to end through FTS: real `twistd -n transferd` on MariaDB and RabbitMQ, with [transfer] backend = fts,
against a real `twistd -n transferd-fakefts --copy` process, on loopback.

The fake copies files between the local paths of their URLs, so products staged by the local stager
(gsiftp://<this host>/<staging path>) really arrive under gsiftp://localhost/<deliveries> and the bytes are
compared.  Authentication is a bearer token in a file.
"""

import filecmp
import os
import signal
import subprocess

import treq
from twisted.internet import defer
from twisted.trial import unittest

from transferd import jobs, sample
from tests import mysql_support
from tests.amqp_support import TestBroker, with_options
from tests.daemon import TWISTD, Daemon, daemon_config, free_port
from tests.support import wait_for

TOKEN = "e2e-fts-token"


class FakeFTSProcess:
    """`twistd -n transferd-fakefts` on a port of its own; start() waits until it answers."""

    def __init__(self, workdir, port, *arguments):
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.arguments = list(arguments)
        self.process = None
        self.starts = 0

    @property
    def logfile(self):
        return os.path.join(self.workdir, f"fakefts-{self.starts}.log")

    @defer.inlineCallbacks
    def start(self, timeout=20):
        self.starts += 1
        self.process = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", self.logfile, "transferd-fakefts",
             "--endpoint", f"tcp:{self.port}:interface=127.0.0.1", "--token", TOKEN, *self.arguments],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.logfile + ".stderr", "w"),
        )
        yield wait_for(self._answers, timeout, interval=0.1)

    @defer.inlineCallbacks
    def _answers(self):
        if self.process.poll() is not None:
            with open(self.logfile + ".stderr") as handle:
                raise AssertionError(f"transferd-fakefts exited with {self.process.returncode}: {handle.read()}")
        try:
            response = yield treq.get(self.url + "/", timeout=2, persistent=False)
            yield response.content()
            return response.code == 200
        except Exception:
            return False

    @defer.inlineCallbacks
    def state(self):
        response = yield treq.get(self.url + "/_fake/state", timeout=5, persistent=False)
        return (yield response.json())

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class FTSEndToEndTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        self.archive = os.path.join(self.workdir, "archive")
        self.deliveries = os.path.join(self.workdir, "deliveries")
        os.makedirs(self.deliveries)
        sample.create(self.archive)
        self.token_file = os.path.join(self.workdir, "fts-token")
        with open(self.token_file, "w") as handle:
            handle.write(TOKEN + "\n")
        self.database_url = mysql_support.fresh_database(self)
        self.broker = TestBroker(self)
        yield self.broker.check()
        self.destination = "gsiftp://localhost" + self.deliveries

    def product(self, name, files):
        """A product in the archive: a file (files is bytes) or a directory ({relative path: bytes})."""
        path = os.path.join(self.archive, name)
        if isinstance(files, bytes):
            files = {"": files}
        for relative, data in files.items():
            target = os.path.join(path, relative) if relative else path
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)

    @defer.inlineCallbacks
    def start(self, *fake_arguments, fts=None, queue=None, start_fake=True):
        """Start the fake FTS (unless start_fake is False) and transferd pointing at it: (daemon, fake)."""
        fake = FakeFTSProcess(self.workdir, free_port(), "--copy", "--duration", "0.2", *fake_arguments)
        self.addCleanup(fake.stop)
        if start_fake:
            yield fake.start()
        port = free_port()
        settings = {
            "endpoint": fake.url, "auth": "token", "token_file": self.token_file,
            "source_template": "gsiftp://{staged_to}{path}", "poll_interval": "0.2", "bulk_size": "20",
            "transfer_timeout": "30",
        }
        settings.update(fts or {})
        queue_settings = {"url": with_options(self.broker.url, prefix=self.broker.prefix, retry_delay="0.2")}
        queue_settings.update(queue or {})
        config = daemon_config(
            self.workdir, port,
            database={"url": self.database_url},
            queue=queue_settings,
            transfer={"backend": "fts", "allowed_schemes": "gsiftp"},
            fts=settings,
        )
        daemon = Daemon(self.workdir, config, port)
        self.addCleanup(daemon.stop)
        yield daemon.start()
        return daemon, fake

    def assertDelivered(self, product_id):
        source = os.path.join(self.archive, product_id)
        target = os.path.join(self.deliveries, product_id)
        if os.path.isdir(source):
            for root, _, files in os.walk(source):
                for name in files:
                    path = os.path.join(root, name)
                    self.assertTrue(filecmp.cmp(path, os.path.join(target, os.path.relpath(path, source)),
                                                shallow=False), path)
        else:
            self.assertTrue(filecmp.cmp(source, target, shallow=False))

    @staticmethod
    def wait_detail(daemon, job_id, words):
        """Wait until the job's detailed_status says words."""

        @defer.inlineCallbacks
        def says():
            return words in (yield daemon.status(job_id)).get("detailed_status", "")

        return wait_for(says, 20, interval=0.1)

    @staticmethod
    def fts_jobs_for(state, job_id):
        return [job for job in state["jobs"] if job["sid"] == job_id]

    @defer.inlineCallbacks
    def test_file_and_directory_products_delivered(self):
        """A file product and a directory product go through FTS to SUCCESS, byte for byte, one FTS job each."""
        daemon, fake = yield self.start()
        job_ids = []
        for product in ("sample-001", "sample-002"):
            job_ids.append((yield daemon.submit(product, self.destination)))
        views = yield daemon.wait_terminal(job_ids, timeout=20)
        for job_id in job_ids:
            self.assertEqual(views[job_id]["status"], jobs.SUCCESS, views[job_id])
            self.assertIn("FTS delivered", views[job_id]["detailed_status"])
            self.assertIn('"job_state": "FINISHED"', views[job_id]["fts_details"])
        self.assertDelivered("sample-001")
        self.assertDelivered("sample-002")
        state = yield fake.state()
        for job_id in job_ids:
            self.assertEqual(len(self.fts_jobs_for(state, job_id)), 1)
            self.assertEqual(state["submissions"][job_id], 1)
        directory_job = self.fts_jobs_for(state, job_ids[1])[0]
        self.assertEqual(len(directory_job["files"]), 3, "one FTS job, one entry per file")

    @defer.inlineCallbacks
    def test_fts_failure_and_finished_dirty(self):
        """A failed FTS job ends in ERROR with FTS's reason; a partly failed one (FINISHEDDIRTY) names the file."""
        self.product("broken-product", b"x" * 1000)
        self.product("dirty-product", {"good.dat": b"g" * 2000, "bad.dat": b"b" * 3000})
        daemon, fake = yield self.start(
            "--fail", "broken-product=FAILED:SOURCE [5] simulated: the disk server is offline",
            "--fail", "dirty-product/bad.dat=FAILED:TRANSFER [70] simulated: checksum mismatch")
        broken = yield daemon.submit("broken-product", self.destination)
        dirty = yield daemon.submit("dirty-product", self.destination)
        views = yield daemon.wait_terminal([broken, dirty], timeout=20)
        self.assertEqual(views[broken]["status"], jobs.ERROR)
        self.assertIn("ended FAILED", views[broken]["detailed_status"])
        self.assertIn("the disk server is offline", views[broken]["detailed_status"])
        self.assertIn('"file_state": "FAILED"', views[broken]["fts_details"])
        self.assertEqual(views[dirty]["status"], jobs.ERROR)
        self.assertIn("ended FINISHEDDIRTY", views[dirty]["detailed_status"])
        self.assertIn("dirty-product/bad.dat: FAILED: TRANSFER [70] simulated: checksum mismatch",
                      views[dirty]["detailed_status"])
        with open(os.path.join(self.deliveries, "dirty-product", "good.dat"), "rb") as handle:
            self.assertEqual(handle.read(), b"g" * 2000)

    @defer.inlineCallbacks
    def test_lost_job(self):
        """A job FTS forgets ends in ERROR "lost by FTS"."""
        self.product("lost-product", b"l" * 100)
        daemon, fake = yield self.start("--fail", "lost-product=LOST")
        job_id = yield daemon.submit("lost-product", self.destination)
        view = (yield daemon.wait_terminal([job_id], timeout=20))[job_id]
        self.assertEqual(view["status"], jobs.ERROR)
        self.assertIn("lost by FTS", view["detailed_status"])
        state = yield fake.state()
        self.assertEqual(self.fts_jobs_for(state, job_id), [])
        self.assertEqual(len(state["lost"]), 1)

    @defer.inlineCallbacks
    def test_timeout_cancels_at_fts(self):
        """A transfer running past transfer_timeout is cancelled at FTS (DELETE), then ends in ERROR."""
        self.product("slow-product", b"s" * 100)
        daemon, fake = yield self.start("--slow", "slow-product=60", fts={"transfer_timeout": "2"})
        job_id = yield daemon.submit("slow-product", self.destination)
        view = (yield daemon.wait_terminal([job_id], timeout=20))[job_id]
        self.assertEqual(view["status"], jobs.ERROR)
        self.assertIn("transfer timed out after 2s", view["detailed_status"])
        state = yield fake.state()
        self.assertEqual([job["job_state"] for job in self.fts_jobs_for(state, job_id)], ["CANCELED"])
        self.assertGreaterEqual(state["requests"]["DELETE /jobs/{ids}"], 1)
        self.assertFalse(os.path.exists(os.path.join(self.deliveries, "slow-product")))

    @defer.inlineCallbacks
    def test_kill_9_between_submission_and_record(self):
        """transferd killed while FTS holds its POST's answer resubmits after a restart: one FTS job, SUCCESS."""
        daemon, fake = yield self.start("--submit-delay", "30")
        job_id = yield daemon.submit("sample-001", self.destination)

        @defer.inlineCallbacks
        def fts_has_it():
            return self.fts_jobs_for((yield fake.state()), job_id)

        yield wait_for(fts_has_it, 20, interval=0.1)
        view = yield daemon.status(job_id)
        self.assertEqual(view["status"], jobs.STAGED, "the POST is still unanswered")
        self.assertEqual(view["fts_jobid"], (yield fts_has_it())[0]["job_id"], "recorded before the POST")
        daemon.kill()
        yield daemon.start()
        view = (yield daemon.wait_terminal([job_id], timeout=20))[job_id]
        self.assertEqual(view["status"], jobs.SUCCESS, view)
        self.assertDelivered("sample-001")
        state = yield fake.state()
        self.assertEqual(len(self.fts_jobs_for(state, job_id)), 1)
        self.assertEqual(state["submissions"][job_id], 1)
        self.assertGreaterEqual(state["requests"]["POST /jobs"], 2, "the restarted daemon submitted again: 409")
        self.assertIn("not submitted again", daemon.logs())

    @defer.inlineCallbacks
    def test_fts_down_then_back(self):
        """While FTS is down jobs wait STAGED; once it is back they are submitted and delivered."""
        daemon, fake = yield self.start(start_fake=False, queue={"max_deliveries": "100"})
        job_id = yield daemon.submit("sample-001", self.destination)
        yield self.wait_detail(daemon, job_id, "Connection was refused")
        self.assertEqual((yield daemon.status(job_id))["status"], jobs.STAGED)
        self.assertIn("could not tell our VO at start-up", daemon.logs())
        yield fake.start()
        view = (yield daemon.wait_terminal([job_id], timeout=20))[job_id]
        self.assertEqual(view["status"], jobs.SUCCESS, view)
        self.assertDelivered("sample-001")
        self.assertEqual(len(self.fts_jobs_for((yield fake.state()), job_id)), 1)

    @defer.inlineCallbacks
    def test_a_token_fts_refuses_waits_for_its_renewal(self):
        """A token FTS takes for anonymous leaves the job STAGED, logged once as an error; the renewed token delivers it."""
        with open(self.token_file, "w") as handle:
            handle.write("stale-token\n")
        daemon, fake = yield self.start()
        job_id = yield daemon.submit("sample-001", self.destination)
        yield self.wait_detail(daemon, job_id, "takes us for an anonymous user")
        self.assertEqual((yield daemon.status(job_id))["status"], jobs.STAGED)
        with open(self.token_file, "w") as handle:
            handle.write(TOKEN + "\n")
        view = (yield daemon.wait_terminal([job_id], timeout=20))[job_id]
        self.assertEqual(view["status"], jobs.SUCCESS, view)
        self.assertDelivered("sample-001")
        self.assertEqual(daemon.logs().count("FTS credentials:"), 1)
        self.assertIn("accepts our credentials again", daemon.logs())
