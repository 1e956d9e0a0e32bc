"""The RabbitMQ JobQueue against a real broker (see tests/amqp_support.py)."""

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from transferd.config import parse_queue_url
from transferd.queue import open_queue
from transferd.queue.amqp import (
    DELIVERIES_HEADER,
    REASON_HEADER,
    AMQPJobQueue,
    AMQPSettings,
    PublishRefused,
    QueueUnavailable,
)
from tests.amqp_support import TestBroker, with_options
from tests.contract_queue import NO_DEAD_LETTERS, JobQueueContract
from tests.support import wait_for


class BrokerTestCase(unittest.TestCase):
    """Each test gets a private queue prefix on the test broker."""

    def setUp(self):
        self.broker = TestBroker(self)
        return self.broker.check()

    def start_queue(self, max_deliveries=3):
        """Fire with a started queue, once it is connected."""
        queue = AMQPJobQueue.from_url(parse_queue_url(self.broker.queue_url), reactor, max_deliveries=max_deliveries)
        queue.startService()
        self.addCleanup(queue.stopService)
        d = wait_for(lambda: queue.connected, 10)
        return d.addCallback(lambda _: queue)


class AMQPJobQueueContractTests(JobQueueContract, BrokerTestCase):
    redelivery_wait = 5.0

    def make_queue(self, max_deliveries):
        return self.start_queue(max_deliveries)


class AMQPJobQueueTests(BrokerTestCase):
    def capture_log(self):
        """Collect the queue's own log lines."""
        lines = []

        def observe(event):
            if event.get("log_namespace") == "transferd.queue.amqp.AMQPJobQueue":
                lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines

    @defer.inlineCallbacks
    def test_stopped_consumer_gives_its_messages_to_the_others(self):
        """A drained queue takes no more messages, even once it acked the one it was handling: another
        daemon's consumer gets them all."""
        drained = yield self.start_queue()
        other = yield self.start_queue()
        started, release = [], defer.Deferred()

        def slow(job_id):
            started.append(job_id)
            return release

        drained.consume("staging", slow, 1, NO_DEAD_LETTERS)
        for i in range(6):
            yield drained.publish("staging", f"job-{i}")
        yield wait_for(lambda: len(started) == 1, 5)
        drained.stop_consuming()
        release.callback(None)  # its ack would have made room for the next message, had it kept consuming
        yield task.deferLater(reactor, 0.3, lambda: None)
        taken = []
        other.consume("staging", taken.append, 8, NO_DEAD_LETTERS)
        yield wait_for(lambda: len(taken) == 5, 5)
        self.assertEqual(sorted(taken + started), [f"job-{i}" for i in range(6)])
        self.assertEqual(len(started), 1)

    @defer.inlineCallbacks
    def test_messages_survive_restart(self):
        """A job id published with nobody consuming is delivered by a queue service started later."""
        queue = yield self.start_queue()
        yield queue.publish("staging", "durable-1")
        yield queue.stopService()
        again = yield self.start_queue()
        seen = []
        again.consume("staging", seen.append, 1, NO_DEAD_LETTERS)
        yield wait_for(lambda: seen == ["durable-1"], 5)

    @defer.inlineCallbacks
    def test_dead_letter_queue_holds_the_message(self):
        """After max_deliveries failures the job id sits, persistent, in <prefix>.<queue>.dead."""
        queue = yield self.start_queue(max_deliveries=2)
        dead = []
        on_dead = lambda name, job_id, reason: dead.append((name, job_id, reason))  # noqa: E731

        def handler(job_id):
            raise RuntimeError("tape library offline")

        queue.consume("transfer", handler, 1, on_dead)
        yield queue.publish("transfer", "poison")
        yield wait_for(lambda: dead, 5)
        yield queue.stopService()  # unacked messages, if any, would now be back in their queue
        self.assertEqual(dead[0][:2], ("transfer", "poison"))
        self.assertEqual((yield self.broker.message_count(queue.queue_name("transfer"))), 0)
        message = yield self.broker.get_message(queue.queue_name("transfer") + ".dead")
        self.assertEqual(message.body, b"poison")
        self.assertEqual(message.properties.delivery_mode, 2)
        self.assertEqual(message.properties.headers[DELIVERIES_HEADER], 2)
        self.assertIn("tape library offline", message.properties.headers[REASON_HEADER])

    @defer.inlineCallbacks
    def test_reconnects_after_the_broker_drops_the_connection(self):
        """When the broker drops the connection, publish fails at once; then all works again by itself."""
        log = self.capture_log()
        queue = yield self.start_queue()
        seen, held = [], defer.Deferred()

        def handler(job_id):
            seen.append(job_id)
            if seen == ["held"]:
                return held  # still running when the connection goes

        queue.consume("staging", handler, 2, NO_DEAD_LETTERS)
        yield queue.publish("staging", "held")
        yield wait_for(lambda: seen == ["held"], 5)

        yield defer.Deferred.fromCoroutine(self.broker.close_connection(queue.connection_name))
        yield wait_for(lambda: not queue.connected, 5)
        failure = self.failureResultOf(queue.publish("staging", "during"), QueueUnavailable)
        self.assertEqual(failure.getErrorMessage(), "RabbitMQ is not connected")
        held.callback(None)  # its delivery tag died with the channel: nothing to ack, nothing breaks

        yield wait_for(lambda: queue.connected, 10)
        yield queue.publish("staging", "after")
        yield wait_for(lambda: sorted(seen) == ["after", "held", "held"], 5)
        self.assertEqual(len([line for line in log if "went away" in line]), 1)
        self.assertEqual(len([line for line in log if "is back after" in line]), 1)

    def test_publish_without_broker_fails_at_once(self):
        """With no broker to talk to, publish fails immediately with QueueUnavailable."""
        url = with_options("amqp://guest:guest@127.0.0.1:1/", prefix=self.broker.prefix)
        queue = AMQPJobQueue.from_url(parse_queue_url(url), reactor)
        queue.startService()
        self.addCleanup(queue.stopService)
        failure = self.failureResultOf(queue.publish("staging", "job-1"), QueueUnavailable)
        self.assertEqual(failure.getErrorMessage(), "RabbitMQ is not connected")

    @defer.inlineCallbacks
    def test_returned_message_fails_publish(self):
        """A message the broker cannot route (its queue was deleted) fails the publish."""
        queue = yield self.start_queue()
        yield self.broker.delete_queue(queue.queue_name("staging"))
        yield self.assertFailure(queue.publish("staging", "lost"), PublishRefused)

    @defer.inlineCallbacks
    def test_stop_waits_for_running_handlers(self):
        """stopService lets a running handler finish and acks its message before closing."""
        queue = yield self.start_queue()
        release, started = defer.Deferred(), []

        def handler(job_id):
            started.append(job_id)
            return release

        queue.consume("staging", handler, 1, NO_DEAD_LETTERS)
        yield queue.publish("staging", "slow")
        yield wait_for(lambda: started, 5)
        stopping = queue.stopService()
        self.assertNoResult(stopping)
        release.callback(None)
        yield stopping
        self.assertEqual((yield self.broker.message_count(queue.queue_name("staging"))), 0)


class URLTests(unittest.SynchronousTestCase):
    def test_url_parts(self):
        """The URL gives host, port, credentials, a percent-encoded vhost and the query options."""
        settings = AMQPSettings(parse_queue_url(
            "amqp://user:p%40ss@mq.example.org:5673/science%2Fprod"
            "?prefix=tx&heartbeat=10&blocked_connection_timeout=20&retry_delay=2"
        ))
        parameters = settings.parameters
        self.assertEqual((parameters.host, parameters.port), ("mq.example.org", 5673))
        self.assertEqual(parameters.virtual_host, "science/prod")
        self.assertEqual((parameters.credentials.username, parameters.credentials.password), ("user", "p@ss"))
        self.assertEqual((parameters.heartbeat, parameters.blocked_connection_timeout), (10, 20))
        self.assertEqual((settings.prefix, settings.retry_delay), ("tx", 2.0))

    def test_defaults(self):
        """Without a path the vhost is "/", the prefix "transferd", the port 5672."""
        for url in ("amqp://guest:guest@localhost", "amqp://guest:guest@localhost/"):
            settings = AMQPSettings(parse_queue_url(url))
            self.assertEqual(
                (settings.parameters.virtual_host, settings.prefix, settings.port), ("/", "transferd", 5672)
            )

    def test_unknown_option(self):
        """A misspelt option is refused rather than ignored."""
        self.assertRaises(ValueError, parse_queue_url, "amqp://localhost/?heartbeet=5")

    def test_open_queue(self):
        """open_queue builds the RabbitMQ queue for amqp:// URLs, mapping names under the prefix."""
        queue = open_queue(parse_queue_url("amqp://localhost/?prefix=p1"), reactor, reactor, max_deliveries=4)
        self.assertIsInstance(queue, AMQPJobQueue)
        self.assertEqual((queue.queue_name("transfer"), queue.max_deliveries), ("p1.transfer", 4))
