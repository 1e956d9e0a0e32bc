"""/readyz and /metrics of the real daemon while its MariaDB, then its RabbitMQ, are killed -9 and started again.

Private servers (tests/private_servers.py): marked outage like tests/test_outages.py.
"""

import pytest
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer

from tests.support import wait_for
from tests.test_outages import OutageTestCase

pytestmark = pytest.mark.outage


class ReadinessOutageTests(OutageTestCase):
    def database(self):
        return self.private_database()

    def queue(self):
        return self.private_queue()

    @defer.inlineCallbacks
    def readyz(self, daemon):
        response = yield treq.get(daemon.url + "/readyz?verbose", timeout=10, persistent=False)
        return response.code, (yield response.text())

    @defer.inlineCallbacks
    def gauge(self, daemon, name):
        response = yield treq.get(daemon.url + "/metrics", timeout=10, persistent=False)
        text = yield response.text()
        self.assertEqual(response.code, 200, text)  # /metrics answers whatever is away
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
        return family.samples[0].value

    def broker_connected(self, daemon):
        return self.gauge(daemon, "transferd_broker_connected")

    def counted_at(self, daemon):
        return self.gauge(daemon, "transferd_jobs_counted_timestamp_seconds")

    @defer.inlineCallbacks
    def wait_ready(self, daemon, code, lines):
        """Wait until /readyz?verbose answers code with exactly these check lines."""
        expected = "\n".join(lines) + ("\nreadyz check passed\n" if code == 200 else "\nreadyz check failed\n")

        @defer.inlineCallbacks
        def answered():
            return (yield self.readyz(daemon)) == (code, expected)

        try:
            yield wait_for(answered, 60, interval=0.2)
        except AssertionError:
            raise AssertionError(f"/readyz never answered {code} {expected!r}; last: {(yield self.readyz(daemon))}")

    @defer.inlineCallbacks
    def test_readyz_follows_the_database_and_the_broker(self):
        """/readyz is 200 with both up, 503 naming the store while MariaDB is away, 503 naming the queue while
        RabbitMQ is away, and 200 again once each is back; transferd_broker_connected follows the broker."""
        daemon = yield self.start_daemon(metrics={"job_counts_max_age": "0.1"})
        ok = ["[+]store ok", "[+]queue ok"]
        yield self.wait_ready(daemon, 200, ok)
        self.assertEqual((yield self.broker_connected(daemon)), 1)

        yield self.mariadb.kill()
        yield self.wait_ready(daemon, 503, ["[-]store failed: unreachable", "[+]queue ok"])
        stale = yield self.counted_at(daemon)  # the last counts stay, with the time they were read
        self.assertEqual((yield self.counted_at(daemon)), stale)
        yield self.mariadb.start()
        yield self.wait_ready(daemon, 200, ok)
        yield wait_for(lambda: self.counted_at(daemon).addCallback(lambda moment: moment > stale), 10, interval=0.2)

        yield self.rabbitmq.kill()
        yield self.wait_ready(daemon, 503, ["[+]store ok", "[-]queue failed: not connected"])
        self.assertEqual((yield self.broker_connected(daemon)), 0)
        yield self.rabbitmq.start()
        yield self.wait_ready(daemon, 200, ok)
        self.assertEqual((yield self.broker_connected(daemon)), 1)
        self.assertNotIn("Traceback", daemon.logs())
