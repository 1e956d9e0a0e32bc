"""AMQP events: each state change published to the topic exchange, consumed from a real RabbitMQ queue bound to it."""

import json
import os

from twisted.internet import defer
from twisted.trial import unittest

from tests.amqp_support import TestBroker
from tests.harness import Harness
from tests.support import wait_for
from transferd import jobs


class AMQPEventTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_state_changes_published_to_topic_exchange(self):
        """A queue bound with job.# receives every state of a job, in order, persistent, with FTS3's field names;
        one bound with job.success only the SUCCESS."""
        broker = TestBroker(self)
        yield broker.check()
        exchange = f"{broker.prefix}.events"
        every, success = f"{broker.prefix}.test-every", f"{broker.prefix}.test-success"

        async def bind(channel):
            await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
            for name, key in ((every, "job.#"), (success, "job.success")):
                await channel.queue_declare(name, durable=False, auto_delete=False)
                await channel.queue_bind(name, exchange, routing_key=key)

        async def unbind(channel):
            for name in (every, success):
                await channel.queue_delete(name)
            await channel.exchange_delete(exchange)

        yield defer.Deferred.fromCoroutine(broker._with_channel(bind))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(broker._with_channel(unbind)))
        harness = Harness(os.path.abspath(self.mktemp()), {("queue", "url"): broker.queue_url,
                                                           ("events", "sweep_interval"): "3600"})
        self.addCleanup(harness.close)
        yield harness.start()
        response, body = yield harness.request(
            "POST", "/api/v1/jobs", headers={"Content-Type": "application/json"}, data=json.dumps({"jobs": [
                {"product_id": "sample-001", "destination_path": harness.destination, "metadata": {"run": 7}}]}).encode())
        job_id = json.loads(body)["results"][0]["job_id"]
        yield wait_for(lambda: broker.message_count(every).addCallback(lambda n: n >= 5), timeout=30)
        messages = []
        for _ in range(5):
            messages.append((yield broker.get_message(every)))
        keys = [message.method.routing_key for message in messages]
        self.assertEqual(keys, ["job.submitted", "job.staging", "job.staged", "job.transferring", "job.success"])
        self.assertEqual({message.properties.delivery_mode for message in messages}, {2})
        bodies = [json.loads(message.body) for message in messages]
        self.assertEqual([body["job_state"] for body in bodies], [state for state in jobs.STATES[:5]])
        last = bodies[-1]
        self.assertEqual((last["job_id"], last["previous_job_state"], last["dst_url"], last["job_metadata"],
                          last["product_id"]), (job_id, jobs.TRANSFERRING, harness.destination, {"run": 7}, "sample-001"))
        for name in ("submit_time", "staging_start", "staging_finished", "timestamp", "src_url"):
            self.assertIsNotNone(last[name], name)
        self.assertEqual(len({message.properties.message_id for message in messages}), 5)
        only = yield broker.get_message(success)
        self.assertEqual((only.method.routing_key, json.loads(only.body)["job_id"]), ("job.success", job_id))
        self.assertEqual((yield broker.message_count(success)), 0)
