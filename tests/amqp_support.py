"""RabbitMQ for tests: the broker URL, a private queue prefix per test, and cleanup.

The broker is TRANSFERD_TEST_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/).
When it cannot be reached the tests fail, saying so: CI must run them.
rabbitmqctl (or TRANSFERD_TEST_RABBITMQCTL, e.g. "docker exec rabbit rabbitmqctl")
closes connections from the broker side.
"""

import os
import shlex
import shutil
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer, reactor
from twisted.internet.endpoints import connectProtocol
from twisted.internet.utils import getProcessOutputAndValue

from transferd.config import parse_queue_url
from transferd.queue import STAGING_QUEUE, TRANSFER_QUEUE
from transferd.queue.amqp import DEAD_SUFFIX, AMQPSettings

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def broker_url():
    return os.environ.get("TRANSFERD_TEST_AMQP_URL", DEFAULT_URL)


def with_options(url, **options):
    """url with query options added (or replaced)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(options)
    return urlunsplit(parts._replace(query=urlencode(query)))


class TestBroker:
    """One test's share of the broker: a random queue prefix whose queues go away at cleanup."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, testcase):
        self.url = broker_url()
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        # A short retry delay keeps redelivery tests fast.
        self.queue_url = with_options(self.url, prefix=self.prefix, retry_delay="0.02")
        self._testcase = testcase

    def queue_names(self):
        return [
            f"{self.prefix}.{name}{suffix}"
            for name in (STAGING_QUEUE, TRANSFER_QUEUE)
            for suffix in ("", DEAD_SUFFIX)
        ]

    def check(self):
        """Fail (never skip) with a clear message when the broker cannot be reached.

        Once it is reached, the test's queues are deleted at cleanup.
        """

        async def ping(channel):
            return None

        d = defer.Deferred.fromCoroutine(self._with_channel(ping))
        d.addTimeout(10, reactor)

        def unreachable(failure):
            raise AssertionError(
                f"RabbitMQ is not reachable at {_hide_password(self.url)} "
                f"({failure.getErrorMessage() or failure.type.__name__}): start it, "
                "or point TRANSFERD_TEST_AMQP_URL at one; these tests must run"
            )

        d.addCallbacks(lambda _: self._testcase.addCleanup(self.delete_queues), unreachable)
        return d

    def delete_queues(self):
        async def delete(channel):
            for name in self.queue_names():
                await channel.queue_delete(name)

        return defer.Deferred.fromCoroutine(self._with_channel(delete))

    def delete_queue(self, name):
        async def delete(channel):
            await channel.queue_delete(name)

        return defer.Deferred.fromCoroutine(self._with_channel(delete))

    def message_count(self, name):
        """Fire with the number of ready (not unacked) messages in queue name."""

        async def count(channel):
            frame = await channel.queue_declare(name, passive=True)
            return frame.method.message_count

        return defer.Deferred.fromCoroutine(self._with_channel(count))

    def get_message(self, name):
        """Take one message off queue name: fire with a pika ReceivedMessage, or None."""

        async def get(channel):
            return await channel.basic_get(name, auto_ack=True)

        return defer.Deferred.fromCoroutine(self._with_channel(get))

    async def close_connection(self, connection_name):
        """Make the broker close the connection of that name, as a broker restart would."""
        listing = await self._rabbitmqctl("-q", "list_connections", "pid", "client_properties")
        marker = f'{{"connection_name","{connection_name}"}}'
        pids = [line.split("\t")[0] for line in listing.splitlines() if marker in line]
        if not pids:
            raise AssertionError(f"the broker has no connection named {connection_name!r}:\n{listing}")
        for pid in pids:
            await self._rabbitmqctl("-q", "close_connection", pid, "closed by a transferd test")

    async def _rabbitmqctl(self, *args):
        command = shlex.split(os.environ.get("TRANSFERD_TEST_RABBITMQCTL", "rabbitmqctl"))
        executable = shutil.which(command[0])
        if executable is None:
            raise AssertionError(f"{command[0]} not found; set TRANSFERD_TEST_RABBITMQCTL")
        out, err, code = await getProcessOutputAndValue(
            executable, command[1:] + list(args), env=os.environ
        )
        if code != 0:
            raise AssertionError(f"{' '.join(command + list(args))} failed ({code}): {err.decode()}")
        return out.decode()

    async def _with_channel(self, work):
        """Run work(channel) on a short-lived connection of our own, closed afterwards."""
        settings = AMQPSettings(parse_queue_url(self.url))
        connection = TwistedProtocolConnection(settings.parameters)
        await connectProtocol(settings.endpoint(reactor), connection)
        try:
            await connection.ready
            channel = await connection.channel()
            return await work(channel)
        finally:
            closed = connection.close()
            if closed is not None:
                await closed


def _hide_password(url):
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
