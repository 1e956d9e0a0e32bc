"""Outages: 200 jobs in flight through the real daemon while a server it needs is gone.

Each test takes a server down for real: a MariaDB or RabbitMQ of its own
(tests/private_servers.py) killed with -9 and started again, both at once
with the daemon killed meanwhile, or the reference stager killed for a
minute.  Every accepted job must end SUCCESS, every product delivered once.
They are slow (a RabbitMQ node takes seconds to start, a stager is away for a
minute): marked outage, scripts/test.sh runs them side by side, each with its
own servers.
"""

import time

import pytest
import treq
from twisted.internet import defer, reactor, task

from transferd import jobs
from tests.daemon import free_port
from tests.private_servers import PrivateMariaDB, PrivateRabbitMQ
from tests.support import wait_for
from tests.test_e2e_staging import StagerDaemon
from tests.test_faults import JOBS, FaultTestCase

pytestmark = pytest.mark.outage


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class OutageTestCase(FaultTestCase):
    timeout = 420

    @defer.inlineCallbacks
    def private_database(self):
        self.mariadb = PrivateMariaDB(self)
        yield self.mariadb.start()
        self.mariadb.execute("CREATE DATABASE transferd")
        return self.mariadb.url("transferd")

    @defer.inlineCallbacks
    def private_queue(self):
        self.rabbitmq = PrivateRabbitMQ(self)
        yield self.rabbitmq.start()
        return (yield FaultTestCase.queue(self, self.rabbitmq.url))

    @defer.inlineCallbacks
    def mid_run(self, count=JOBS, **overrides):
        """A daemon (with overrides) and count jobs submitted to it, a fifth of them done: fire (daemon, job ids)."""
        daemon = yield self.start_daemon(**overrides)
        job_ids = yield self.submit_all([daemon], count=count)
        yield self.wait_until_some_done(daemon, job_ids)
        return daemon, job_ids

    @defer.inlineCallbacks
    def answer(self, daemon, method, path, **kwargs):
        """One request as curl would send it: (code, Retry-After, JSON body, seconds it took)."""
        started = time.monotonic()
        response = yield treq.request(method, daemon.url + path, timeout=30, persistent=False, **kwargs)
        body = yield response.json()
        return response.code, response.headers.getRawHeaders("retry-after"), body, time.monotonic() - started

    @defer.inlineCallbacks
    def assertStoreUnavailable(self, daemon, job_id):
        """/transferStatus and /submitTransfer answer 503 with Retry-After and say why; return the slower's seconds."""
        seconds = []
        for method, path, kwargs in (
            ("GET", f"/transferStatus?job_id={job_id}", {}),
            ("POST", "/submitTransfer", {"data": {"product_id": "product-0",
                                                  "destination_path": f"file://{self.deliveries}/refused"}}),
        ):
            code, retry_after, body, took = yield self.answer(daemon, method, path, **kwargs)
            self.assertEqual((code, retry_after, body["error"]), (503, ["5"], True), body)
            self.assertIn("the job store is unavailable", body["msg"])
            seconds.append(took)
        return max(seconds)


class DatabaseKilledTests(OutageTestCase):
    def database(self):
        return self.private_database()

    @defer.inlineCallbacks
    def test_database_killed_and_restarted(self):
        """With its MariaDB killed -9 for 20 s, the API answers 503 at once and every job succeeds once after."""
        # max_deliveries 3: the old daemon dead-lettered the jobs in flight well within the outage.
        daemon, job_ids = yield self.mid_run(queue={"max_deliveries": "3"})
        yield self.mariadb.kill()
        down = reactor.seconds()
        yield wait_for(lambda: "is unreachable" in daemon.logs(), 10)
        slowest = yield self.assertStoreUnavailable(daemon, next(iter(job_ids)))
        # Once the store counts the database as down it answers at once; the
        # prototype-era behaviour took about 4 s of retries before a 500.
        self.assertLess(slowest, 2.0)
        yield sleep(20 - (reactor.seconds() - down))
        yield self.mariadb.start()
        log = yield self.assertAllDeliveredOnce(daemon, job_ids)
        self.assertIn("is back after", log)
        self.assertNotIn("dead-lettered", log)


class BrokerKilledTests(OutageTestCase):
    def queue(self):
        return self.private_queue()

    @defer.inlineCallbacks
    def test_broker_killed_and_restarted(self):
        """With its RabbitMQ killed -9 for 10 s, submissions are still accepted; after the restart every job succeeds once."""
        daemon, job_ids = yield self.mid_run()
        yield self.rabbitmq.kill()
        during = yield self.submit_all([daemon], count=20, offset=JOBS)
        self.assertEqual((yield daemon.status(next(iter(during))))["status"], jobs.SUBMITTED)
        yield sleep(10)
        yield self.rabbitmq.start()
        job_ids.update(during)
        log = yield self.assertAllDeliveredOnce(daemon, job_ids)
        self.assertIn("went away", log)
        self.assertIn("is back", log)


class EverythingKilledTests(OutageTestCase):
    def database(self):
        return self.private_database()

    def queue(self):
        return self.private_queue()

    @defer.inlineCallbacks
    def test_database_broker_and_daemon_killed(self):
        """MariaDB and RabbitMQ killed -9 at once, the daemon killed and started meanwhile: it waits, then all succeed once."""
        daemon, job_ids = yield self.mid_run()
        yield defer.gatherResults([self.mariadb.kill(), self.rabbitmq.kill()])
        yield sleep(2)
        daemon.kill()
        daemon.launch()  # start-up waits for the servers
        yield wait_for(lambda: "waiting for the database" in daemon.logs(), 30)
        yield defer.gatherResults([self.mariadb.start(), self.rabbitmq.start()])
        yield wait_for(daemon._answers, 120, interval=0.2)
        yield self.assertAllDeliveredOnce(daemon, job_ids)


class StagerAwayTests(OutageTestCase):
    @defer.inlineCallbacks
    def test_stager_away_for_a_minute(self):
        """With the callback stager killed -9 for a minute, jobs wait saying why; once it is back every job succeeds once."""
        stager = StagerDaemon(self.workdir, free_port(), "--delay", "1")
        self.addCleanup(stager.stop)
        yield stager.start()
        daemon, job_ids = yield self.mid_run(count=JOBS // 2, stager={
            "backend": "callback", "url": stager.url + "/stage", "timeout": "5", "retry_delay": "0.5"})
        stager.kill()  # what it had accepted and not reported is lost: staged again after [stager] timeout
        away = reactor.seconds()
        during = yield self.submit_all([daemon], count=JOBS // 2, offset=JOBS // 2)

        @defer.inlineCallbacks
        def waiting_for_the_stager():
            views = yield defer.gatherResults([daemon.status(job_id) for job_id in during])
            return [view for view in views
                    if (view.get("detailed_status") or "").startswith(f"waiting: the stager at {stager.url}/stage"
                                                                      " cannot be reached")]

        waiting = yield wait_for(waiting_for_the_stager, 30)
        self.assertEqual(waiting[0]["status"], jobs.STAGING)
        yield sleep(60 - (reactor.seconds() - away))
        yield stager.start()
        job_ids.update(during)
        yield self.assertAllDeliveredOnce(daemon, job_ids, timeout=180)
