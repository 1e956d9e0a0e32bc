"""Fault tests: 200 jobs in flight through real daemons on MariaDB and RabbitMQ.

Each test breaks something mid-run (the broker, the database connections, the
daemon itself, or shares the work between two daemons), then checks that
every job ends SUCCESS and every product was delivered exactly once, by
counting the mover's "delivered" log lines across every daemon run.
"""

import filecmp
import os
import re
import sys

from urllib.parse import urlsplit

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import portforward
from twisted.trial import unittest

from transferd import jobs
from tests import mysql_support
from tests.amqp_support import TestBroker, with_options
from tests.crashing_twistd import CRASH_PRODUCT, CRASH_STATUS
from tests.daemon import Daemon, daemon_config, free_port
from tests.support import wait_for

JOBS = 200
PRODUCTS = 10


class FaultTestCase(unittest.TestCase):
    timeout = 240
    maxDiff = None  # a job that did not succeed is shown whole

    @defer.inlineCallbacks
    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        self.archive = os.path.join(self.workdir, "archive")
        self.deliveries = os.path.join(self.workdir, "deliveries")
        os.makedirs(self.archive)
        os.makedirs(self.deliveries)
        for i in range(PRODUCTS):
            with open(os.path.join(self.archive, f"product-{i}"), "wb") as handle:
                handle.write(os.urandom(2048))
        self.database_url = yield self.database()
        self.queue_url = yield self.queue()
        self.daemons = []

    def database(self):
        """The [database] url: a fresh database on the shared server (tests that kill a server use their own)."""
        return defer.succeed(mysql_support.fresh_database(self))

    @defer.inlineCallbacks
    def queue(self, url=None):
        """The [queue] url: a private prefix on the shared broker, or on the one at url."""
        self.broker = TestBroker(self)
        if url is not None:
            self.broker.url = url
        yield self.broker.check()
        return with_options(self.broker.url, prefix=self.broker.prefix)

    @defer.inlineCallbacks
    def start_daemon(self, name="transferd", **overrides):
        port = free_port()
        sections = {
            "api": {"access_log": "false"},  # the tests poll hard: logs stay short
            "database": {"url": self.database_url},
            "queue": {"url": self.queue_url, "prefetch": "8"},
            "stager": {"delay": "0.05"},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        daemon = Daemon(self.workdir, daemon_config(self.workdir, port, **sections), port, name=name)
        self.addCleanup(daemon.stop)
        yield daemon.start()
        self.daemons.append(daemon)
        return daemon

    @defer.inlineCallbacks
    def submit_all(self, daemons, count=JOBS, offset=0):
        """Submit count jobs, 16 at a time, spread over daemons; each job gets its own destination."""
        semaphore = defer.DeferredSemaphore(16)
        job_ids = {}

        def one(n):
            daemon = daemons[n % len(daemons)]
            destination = f"file://{self.deliveries}/{n}"
            d = daemon.submit(f"product-{n % PRODUCTS}", destination)
            return d.addCallback(lambda job_id: job_ids.__setitem__(job_id, n))

        yield defer.gatherResults([semaphore.run(one, n) for n in range(offset, offset + count)], consumeErrors=True)
        return job_ids

    @defer.inlineCallbacks
    def successes(self, daemon, job_ids):
        views = yield daemon.wait_terminal(list(job_ids), timeout=120)
        return sum(view["status"] == jobs.SUCCESS for view in views.values())

    @defer.inlineCallbacks
    def wait_until_some_done(self, daemon, job_ids, fraction=0.2):
        """Wait until a fraction of the jobs succeeded, so the fault lands mid-run."""
        sample = list(job_ids)[: max(1, len(job_ids) // 5)]

        @defer.inlineCallbacks
        def progressed():
            done = 0
            for job_id in sample:
                done += (yield daemon.status(job_id))["status"] == jobs.SUCCESS
            return done >= fraction * len(sample)

        yield wait_for(progressed, 60, interval=0.05)

    @defer.inlineCallbacks
    def assertAllDeliveredOnce(self, daemon, job_ids, timeout=120):
        views = yield daemon.wait_terminal(list(job_ids), timeout=timeout)
        failed = {job_id: view for job_id, view in views.items() if view["status"] != jobs.SUCCESS}
        self.assertEqual(failed, {}, f"{len(failed)} job(s) did not succeed")
        logs = "\n".join(d.logs() for d in self.daemons)
        delivered = re.findall(r"job ([0-9a-f-]{36}): delivered", logs)
        # A daemon killed after a delivery's last rename but before its log line: the job, re-driven, finds its
        # own delivery and says so instead of copying again.
        found = set(re.findall(r"job ([0-9a-f-]{36}): .* was already delivered by this job", logs))
        counts = {job_id: delivered.count(job_id) or (job_id in found and 1) for job_id in job_ids}
        self.assertEqual({job_id: n for job_id, n in counts.items() if n != 1}, {}, "delivered more or less than once")
        for job_id, n in job_ids.items():
            delivered_file = os.path.join(self.deliveries, str(n), f"product-{n % PRODUCTS}")
            self.assertTrue(filecmp.cmp(os.path.join(self.archive, f"product-{n % PRODUCTS}"), delivered_file, shallow=False))
        return logs


class DatabaseAndDaemonFaultTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_killed_database_connections(self):
        """KILLing the daemon's MariaDB connections mid-run, three times, loses and repeats nothing."""
        daemon = yield self.start_daemon()
        job_ids = yield self.submit_all([daemon])
        yield self.wait_until_some_done(daemon, job_ids)
        database = mysql_support.database_name(self.database_url)
        killed = 0
        for _ in range(3):
            rows = mysql_support.execute(
                "SELECT id FROM information_schema.processlist WHERE db = %s", (database,)
            )
            ids = [row[0] for row in rows]
            mysql_support.kill_connections(ids)
            killed += len(ids)
            yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertGreater(killed, 0)
        yield self.assertAllDeliveredOnce(daemon, job_ids)

    @defer.inlineCallbacks
    def test_kill_9_and_restart(self):
        """kill -9 of the daemon mid-run, then a restart: every job succeeds, delivered once."""
        daemon = yield self.start_daemon()
        job_ids = yield self.submit_all([daemon])
        yield self.wait_until_some_done(daemon, job_ids)
        daemon.kill()
        yield daemon.start()
        yield self.assertAllDeliveredOnce(daemon, job_ids)

    @defer.inlineCallbacks
    def test_two_daemons_share_one_stream(self):
        """Two daemons on one database and one broker share the jobs; no job is staged or delivered twice."""
        first = yield self.start_daemon(name="first")
        second = yield self.start_daemon(name="second")
        job_ids = yield self.submit_all([first, second])
        logs = yield self.assertAllDeliveredOnce(first, job_ids)
        staged = re.findall(r"job ([0-9a-f-]{36}) STAGING -> STAGED", logs)
        self.assertEqual(len(staged), len(job_ids))
        self.assertEqual(set(staged), set(job_ids))
        for daemon in (first, second):
            self.assertIn("STAGING -> STAGED", daemon.logs(), "one daemon did all the work")


class CrashLoopTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_job_that_crashes_the_daemon_every_time_ends_in_error(self):
        """A job whose staging kills the daemon every time ends in ERROR after max_deliveries crashes; the rest succeed once."""
        with open(os.path.join(self.archive, CRASH_PRODUCT), "wb") as handle:
            handle.write(b"this product kills the stager\n")
        daemon = yield self.start_daemon(queue={"max_deliveries": "3"})
        daemon.command = [sys.executable, os.path.join(os.path.dirname(__file__), "crashing_twistd.py")]
        daemon.stop()
        yield daemon.start()  # through the crashing twistd from now on
        job_ids = yield self.submit_all([daemon], count=20)
        crashing = yield daemon.submit(CRASH_PRODUCT, f"file://{self.deliveries}/crash")
        crashes = 0
        while (yield wait_for(lambda: self.crashed_or_failed(daemon, crashing), 60, interval=0.1)) == "crashed":
            crashes += 1  # the reconciler re-drove the job once its dead worker's lease ran out, and it crashed us
            self.assertLessEqual(crashes, 5, "the job is re-driven forever")
            yield daemon.start()
        view = yield daemon.status(crashing)
        self.assertEqual((view["status"], crashes), (jobs.ERROR, 3), view)
        self.assertEqual(view["detailed_status"], "failed 3 times in the staging step: the daemon stopped (crashed"
                                                  " or was killed) while working on it each time")
        yield self.assertAllDeliveredOnce(daemon, job_ids)


    @defer.inlineCallbacks
    def crashed_or_failed(self, daemon, job_id):
        """"crashed" once the daemon has died of the crashing product, "failed" once the job is in ERROR, else False."""
        if daemon.process.poll() is not None:
            self.assertEqual(daemon.process.returncode, CRASH_STATUS, daemon.logs()[-3000:])
            return "crashed"
        try:
            view = yield daemon.status(job_id)
        except Exception:  # it died while answering
            return False
        return "failed" if view["status"] == jobs.ERROR else False


class StartupTests(FaultTestCase):
    """Start-up while the database or the broker is not up yet: wait, logging for what, within the bound."""

    timeout = 90

    def daemon(self, *options, **sections):
        port = free_port()
        sections = {"database": {"url": self.database_url}, "queue": {"url": self.queue_url}, **sections}
        daemon = Daemon(self.workdir, daemon_config(self.workdir, port, **sections), port)
        daemon.options = list(options)
        self.addCleanup(daemon.stop)
        daemon.launch()
        self.daemons.append(daemon)
        return daemon

    @defer.inlineCallbacks
    def exited(self, daemon, expected):
        """The daemon exits 1 with one line saying why (no traceback); fire with its log."""
        yield wait_for(lambda: daemon.process.poll() is not None, 60, interval=0.1)
        self.assertEqual(daemon.process.returncode, 1)
        log = daemon.logs()
        self.assertNotIn("Traceback", log)
        lines = [line for line in log.splitlines() if "transferd cannot start" in line]
        self.assertEqual(len(lines), 1, log[-3000:])
        self.assertRegex(lines[0], expected)
        return log

    @defer.inlineCallbacks
    def test_database_that_does_not_come_up(self):
        """With MariaDB not up, start-up retries with backoff, logging it, then exits 1 naming the database."""
        port = free_port()  # nothing listens there
        daemon = self.daemon(database={"url": f"mysql://root@127.0.0.1:{port}/transferd"},
                             startup={"wait_for_backends": "3"})
        log = yield self.exited(daemon, rf"transferd cannot start: the database at 127.0.0.1:{port}/transferd did"
                                        r" not come up within 3s \(\[startup\] wait_for_backends\): Can't connect")
        self.assertGreaterEqual(log.count(f"waiting for the database at 127.0.0.1:{port}/transferd: "), 2)

    @defer.inlineCallbacks
    def test_broker_that_does_not_come_up(self):
        """With RabbitMQ not up, start-up waits --wait-for-backends seconds, logging it, then exits 1 naming it."""
        port = free_port()
        daemon = self.daemon("--wait-for-backends=2", queue={"url": f"amqp://guest:guest@127.0.0.1:{port}/"})
        log = yield self.exited(daemon, rf"transferd cannot start: RabbitMQ at 127.0.0.1:{port} \(vhost /\) did"
                                        r" not come up within 2s \(\[startup\] wait_for_backends\): ")
        self.assertIn(f"waiting for RabbitMQ at 127.0.0.1:{port} (vhost /): ", log)

    def forward(self, port, target):
        """From now on port answers, forwarding to target (a urlsplit result)."""
        listening = reactor.listenTCP(port, portforward.ProxyFactory(target.hostname, target.port),
                                      interface="127.0.0.1")
        self.addCleanup(listening.stopListening)

    @defer.inlineCallbacks
    def test_backends_that_come_up_late(self):
        """When MariaDB and RabbitMQ come up while start-up waits, the daemon starts and does its work."""
        database, broker = urlsplit(self.database_url), urlsplit(self.queue_url)
        late_database, late_broker = free_port(), free_port()
        daemon = self.daemon(database={"url": self.database_url.replace(f":{database.port}/", f":{late_database}/")},
                             queue={"url": self.queue_url.replace(f":{broker.port}/", f":{late_broker}/")})
        yield wait_for(lambda: "waiting for the database" in daemon.logs(), 30)
        # The servers "come up": their ports start answering, through forwarders to the shared servers.
        self.forward(late_database, database)
        yield wait_for(lambda: "waiting for RabbitMQ" in daemon.logs(), 30)
        self.forward(late_broker, broker)
        yield wait_for(daemon._answers, 60, interval=0.1)
        job_ids = yield self.submit_all([daemon], count=5)
        yield self.assertAllDeliveredOnce(daemon, job_ids)


@pytest.mark.serial
class BrokerRestartTests(FaultTestCase):
    """Stops the whole RabbitMQ node's app: runs alone (scripts/test.sh's serial phase)."""

    @defer.inlineCallbacks
    def rabbitmqctl(self, *args):
        out, err, code = yield getProcessOutputAndValue("rabbitmqctl", args, env=os.environ)
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_broker_stopped_and_started_mid_run(self):
        """With RabbitMQ's app stopped mid-run, submissions and status still answer; after start_app every job succeeds once."""
        daemon = yield self.start_daemon()
        job_ids = yield self.submit_all([daemon])
        yield self.wait_until_some_done(daemon, job_ids)
        yield self.rabbitmqctl("stop_app")
        try:
            during = yield self.submit_all([daemon], count=20, offset=JOBS)
            status = yield daemon.status(next(iter(during)))
            self.assertEqual(status["status"], jobs.SUBMITTED)
        finally:
            yield self.rabbitmqctl("start_app")
        job_ids.update(during)
        yield self.assertAllDeliveredOnce(daemon, job_ids)
        log = daemon.logs()
        self.assertIn("went away", log)
        self.assertIn("is back", log)
