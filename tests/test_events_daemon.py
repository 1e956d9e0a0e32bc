"""Events from the real twistd: kill -9 between the transitions and their deliveries loses and invents nothing."""

import json
import os

from twisted.internet import defer
from twisted.trial import unittest

from tests import mysql_support
from tests.amqp_support import TestBroker
from tests.daemon import Daemon, daemon_config, free_port
from tests.support import wait_for
from tests.test_events import ReceiverMixin, verify, write_secret
from transferd import jobs, sample


class KilledDaemonTests(ReceiverMixin, unittest.TestCase):
    timeout = 120

    def backends(self):
        """Extra config sections: the embedded database and queue."""
        return defer.succeed({})

    @defer.inlineCallbacks
    def test_kill_between_transition_and_delivery(self):
        """The daemon is killed while the receiver holds the SUCCESS webhooks unanswered; after the restart
        each job's SUCCESS reaches the receiver, which keeps exactly one per job by webhook-id, all signed,
        and no event for a state that was not entered."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "deliveries"))
        sample.create(os.path.join(workdir, "archive"))
        key = os.urandom(32)
        secret = write_secret(os.path.join(workdir, "ops.secret"), key)
        receiver, url = yield self.start_receiver()
        receiver.hold()
        port = free_port()
        sections = yield self.backends()
        config = daemon_config(workdir, port, events={
            "subscribers": f"ops {url}/ops {secret}", "timeout": "2", "retry_delay": "0.2", "max_retry_delay": "1",
            "sweep_interval": "1"}, **sections)
        daemon = Daemon(workdir, config, port)
        self.addCleanup(daemon.stop)
        yield daemon.start()
        job_ids = []
        for n in range(3):
            job_ids.append((yield daemon.submit("sample-001", "file://" + os.path.join(workdir, "deliveries", str(n)))))
        # Every SUCCESS sent, none answered (a held one may already be sent again after its timeout).
        yield wait_for(lambda: len({record.headers["webhook-id"] for record in receiver.received}) == 3, timeout=30)
        daemon.kill()
        receiver.release(status=200)  # the connections are gone with the daemon: it never heard an answer
        yield daemon.start()
        yield wait_for(lambda: len([r for r in receiver.received if r.answered == 200]) >= 3, timeout=40)
        yield daemon.wait_terminal(job_ids)
        kept = receiver.unique()
        bodies = [verify(record, key) for record in kept]
        self.assertEqual(sorted((body["data"]["job_id"], body["data"]["state"]) for body in bodies),
                         sorted((job_id, jobs.SUCCESS) for job_id in job_ids))
        self.assertGreaterEqual(len(receiver.received), 6)  # each sent again after the restart: at least once
        self.assertEqual({json.loads(record.body)["data"]["state"] for record in receiver.received}, {jobs.SUCCESS})


class KilledDaemonOnMariaDBTests(KilledDaemonTests):
    """The same on MariaDB and RabbitMQ (the outbox taken FOR UPDATE SKIP LOCKED, AMQP events on as well)."""

    @defer.inlineCallbacks
    def backends(self):
        broker = TestBroker(self)
        yield broker.check()

        async def delete_exchange(channel):
            await channel.exchange_delete(f"{broker.prefix}.events")

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(broker._with_channel(delete_exchange)))
        return {"database": {"url": mysql_support.fresh_database(self)}, "queue": {"url": broker.queue_url}}
