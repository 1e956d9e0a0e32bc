"""End to end: the real `twistd -n transferd` on loopback, on its embedded defaults."""

import filecmp
import os

from twisted.internet import defer
from twisted.trial import unittest

from transferd import jobs, sample
from tests.daemon import Daemon, daemon_config, free_port
from tests.support import wait_for


class EmbeddedDaemonTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.workdir, "deliveries"))
        sample.create(os.path.join(self.workdir, "archive"))
        self.deliveries = os.path.join(self.workdir, "deliveries")

    @defer.inlineCallbacks
    def start(self, **overrides):
        port = free_port()
        daemon = Daemon(self.workdir, daemon_config(self.workdir, port, **overrides), port)
        self.addCleanup(daemon.stop)
        yield daemon.start()
        return daemon

    def assertDelivered(self, product_id):
        source = os.path.join(self.workdir, "archive", product_id)
        target = os.path.join(self.deliveries, product_id)
        if os.path.isdir(source):
            comparison = filecmp.dircmp(source, target)
            self.assertEqual((comparison.left_only, comparison.right_only, comparison.diff_files), ([], [], []))
            for root, _, files in os.walk(source):
                for name in files:
                    path = os.path.join(root, name)
                    self.assertTrue(filecmp.cmp(path, os.path.join(target, os.path.relpath(path, source)), shallow=False))
        else:
            self.assertTrue(filecmp.cmp(source, target, shallow=False))

    @defer.inlineCallbacks
    def test_file_and_directory_products_delivered(self):
        """A file product and a directory product, submitted as curl would, reach SUCCESS byte for byte."""
        daemon = yield self.start()
        destination = "file://" + self.deliveries
        job_ids = []
        for product in ("sample-001", "sample-002"):
            job_ids.append((yield daemon.submit(product, destination)))
        views = yield daemon.wait_terminal(job_ids)
        for job_id in job_ids:
            self.assertEqual(views[job_id]["status"], jobs.SUCCESS, views[job_id])
            self.assertIn("time_staged", views[job_id])
        self.assertDelivered("sample-001")
        self.assertDelivered("sample-002")
        log = daemon.logs()
        for job_id in job_ids:
            self.assertIn(f"job {job_id} TRANSFERRING -> SUCCESS", log)

    @defer.inlineCallbacks
    def test_sighup_does_not_stop_the_daemon(self):
        """SIGHUP reads the configuration again (unchanged: nothing to apply): the daemon keeps answering."""
        import signal

        daemon = yield self.start()
        daemon.process.send_signal(signal.SIGHUP)
        yield wait_for(lambda: "configuration reloaded: no setting that can change while running has changed"
                       in daemon.logs(), 10)
        self.assertIsNone(daemon.process.poll())
        yield daemon.submit("sample-001", "file://" + self.deliveries)

    @defer.inlineCallbacks
    def test_kill_9_mid_flight_loses_nothing(self):
        """After kill -9 with jobs STAGING and TRANSFERRING, a restart brings every job to SUCCESS, delivered once."""
        for i in range(12):
            sample_path = os.path.join(self.workdir, "archive", f"product-{i:02d}")
            with open(sample_path, "wb") as handle:
                handle.write(os.urandom(4096) * (1 + i))
        daemon = yield self.start(stager={"delay": "0.5"}, queue={"prefetch": "4"})
        destination = "file://" + self.deliveries
        job_ids = []
        for i in range(12):
            job_ids.append((yield daemon.submit(f"product-{i:02d}", destination)))

        @defer.inlineCallbacks
        def some_staging_some_done():
            states = []
            for job_id in job_ids:
                states.append((yield daemon.status(job_id))["status"])
            return jobs.STAGING in states and jobs.SUCCESS in states

        yield wait_for(some_staging_some_done, 30, interval=0.05)
        daemon.kill()
        yield daemon.start()
        views = yield daemon.wait_terminal(job_ids, timeout=60)
        self.assertEqual({view["status"] for view in views.values()}, {jobs.SUCCESS}, views)
        log = daemon.logs()
        for i, job_id in enumerate(job_ids):
            self.assertDelivered(f"product-{i:02d}")
            self.assertEqual(log.count(f"job {job_id}: delivered"), 1, job_id)


class StartupRefusalTests(unittest.TestCase):
    """The daemon refuses to start, with a message naming the problem, and exits non-zero."""

    def run_twistd(self, config_text, setup=None):
        import subprocess

        from tests.daemon import TWISTD

        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "archive"))
        if setup:
            setup(workdir)
        path = os.path.join(workdir, "transferd.ini")
        with open(path, "w") as handle:
            handle.write(config_text.format(workdir=workdir, port=free_port()))
        result = subprocess.run(
            [TWISTD, "--pidfile=", "-n", "--logfile=-", "transferd", "--config", path],
            cwd=workdir, capture_output=True, text=True, timeout=60,
        )
        return result.returncode, result.stdout + result.stderr

    base = (
        "[api]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
        "[database]\nurl = sqlite:///{workdir}/jobs.sqlite\n"
        "[stager]\narchive_root = {workdir}/archive\nstaging_root = {workdir}/staging\n"
    )

    def test_unknown_key(self):
        """An unknown key is named and the exit status is non-zero."""
        code, output = self.run_twistd(self.base + "[transfer]\nfile_root = /tmp\n")
        self.assertNotEqual(code, 0)
        self.assertIn("unknown key [transfer] file_root", output)

    def test_bad_value(self):
        """A bad value is named with the reason."""
        code, output = self.run_twistd(self.base + "[queue]\nprefetch = many\n")
        self.assertNotEqual(code, 0)
        self.assertIn("bad value for [queue] prefetch", output)

    def test_schema_too_new(self):
        """A database migrated by a newer transferd stops start-up with a clear message."""
        import sqlite3

        def newer_schema(workdir):
            connection = sqlite3.connect(os.path.join(workdir, "jobs.sqlite"))
            connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            connection.execute("INSERT INTO schema_version VALUES (999)")
            connection.commit()
            connection.close()

        code, output = self.run_twistd(self.base, setup=newer_schema)
        self.assertEqual(code, 1, output)
        self.assertIn("schema is version 999", output)
        self.assertIn("upgrade transferd", output)

    def test_scheme_the_mover_cannot_write(self):
        """Allowing a scheme the configured mover cannot write is refused at start."""
        code, output = self.run_twistd(self.base + "[transfer]\nallowed_schemes = file, gsiftp\n")
        self.assertNotEqual(code, 0)
        self.assertIn("gsiftp", output)
