"""The production JobQueue: RabbitMQ through pika's Twisted adapter.

pika's adapter does not reconnect by itself, so the connection lives inside a
ClientService with exponential backoff; every new connection declares the
topology again, turns on publisher confirms and re-registers the consumers.

Topology, for each queue name N (default prefix "transferd"):

* ``<prefix>.N``       durable work queue; persistent messages whose body is a job id
* ``<prefix>.N.dead``  durable dead-letter queue, inspected by operators
* event exchanges (transferd.events, publish_event): durable topic exchanges,
  declared on each connection the first time an event goes to them

Classic queues do not count deliveries, so failed deliveries are counted in
the message itself: when the handler fails, the message is held for
retry_delay seconds, then a copy carrying the header ``x-transferd-deliveries``
is republished and, once the broker confirmed the copy, the original is acked.
The count thus survives restarts of the daemon and of the broker.  After
max_deliveries the copy goes to ``.dead`` instead and on_dead_letter is called.
A delivery cut short by a lost connection is not counted (its tag is dead; the
broker redelivers the message as it was), nor one whose handler failed because
the job store is away (StoreUnavailable: the copy keeps the count it had).

With start_wait set, startService fires once the first connection is set up,
logging each failed try, and fails when none was within start_wait seconds.
"""

import os
import socket

import pika
import pika.exceptions
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from transferd.interfaces import IJobQueue, StoreUnavailable
from transferd.queue import STAGING_QUEUE, TRANSFER_QUEUE

DELIVERIES_HEADER = "x-transferd-deliveries"
REASON_HEADER = "x-transferd-reason"
DEAD_SUFFIX = ".dead"


class QueueUnavailable(Exception):
    """RabbitMQ cannot take the message right now; the reconciler publishes it later."""


class PublishRefused(Exception):
    """RabbitMQ answered, but refused (nack) or returned the message."""


class AMQPSettings:
    """A parsed amqp:// queue url (transferd.config.QueueURL) as pika and Twisted want it."""

    def __init__(self, url):
        if url.scheme not in ("amqp", "amqps"):
            raise ValueError(f"not an amqp:// or amqps:// url: {url}")
        self.tls = url.tls
        self.host = url.host
        self.port = url.port
        self.vhost = url.vhost
        self.prefix = url.prefix
        self.heartbeat = url.heartbeat
        self.blocked_connection_timeout = url.blocked_connection_timeout
        self.retry_delay = url.retry_delay
        self.connection_name = url.connection_name or (
            f"transferd {self.prefix} on {socket.gethostname()} pid {os.getpid()}"
        )
        self.parameters = pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(url.user, url.password),
            heartbeat=self.heartbeat,
            blocked_connection_timeout=self.blocked_connection_timeout,
            client_properties={"connection_name": self.connection_name},
        )

    def endpoint(self, reactor):
        """The Twisted endpoint for the broker (pika's own host/port/ssl are ignored by its adapter)."""
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=10)
        if self.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint

    def describe(self):
        return f"{self.host}:{self.port} (vhost {self.vhost})"


class _ConnectionFactory(protocol.Factory):
    """Builds one pika connection per TCP connection that ClientService makes."""

    noisy = False  # ClientService and the queue log connections already

    def __init__(self, build):
        self._build = build

    def buildProtocol(self, addr):
        return self._build()


class _Watched:
    """An endpoint that tells on_failure(reason) about each connection attempt that failed."""

    def __init__(self, endpoint, on_failure):
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory):
        def failed(reason):
            self._on_failure(reason)
            return reason

        return self._endpoint.connect(factory).addErrback(failed)


class _Consumer:
    """A consume() registration; it outlives connections."""

    def __init__(self, name, handler, prefetch, on_dead_letter):
        self.name = name
        self.handler = handler
        self.prefetch = prefetch
        self.on_dead_letter = on_dead_letter
        self.connection = None  # the connection this consumer runs on
        self.channel = None  # its channel and consumer tag, while it consumes
        self.tag = None


@implementer(IJobQueue)
class AMQPJobQueue(Service):
    """Job ids in durable RabbitMQ queues, with confirms, manual acks and reconnection."""

    log = Logger()
    durable = True

    def __init__(
        self,
        settings,
        clock,
        max_deliveries=5,
        queue_names=(STAGING_QUEUE, TRANSFER_QUEUE),
        retry_policy=None,
        stop_timeout=10.0,
        start_wait=None,
    ):
        self.settings = settings
        self.clock = clock
        self.max_deliveries = max_deliveries
        self.prefix = settings.prefix
        self.retry_delay = settings.retry_delay
        self.stop_timeout = stop_timeout
        self.start_wait = start_wait  # seconds startService waits for the first connection; None: no wait
        self._names = tuple(queue_names)
        self._backoff = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=30)
        self._client = ClientService(
            _Watched(settings.endpoint(clock), self._connect_failed),
            _ConnectionFactory(self._new_connection),
            retryPolicy=self._retry_after,
            clock=clock,
        )
        self._consumers = {}
        self._in_flight = set()
        self._connection = None  # set only once the connection is fully set up
        self._publisher = None
        self._blocked = None  # the broker's reason while it blocks publishers
        self._failed_setups = 0
        self._lost_at = None
        self._closing = False
        self._delivering = True  # False once stop_consuming() was called
        self._first_connection = None  # fires when a connection is set up, while startService waits for it
        self._exchanges = (None, set())  # (the connection, the event exchanges declared on it)
        self._last_failure = None  # why the last try to connect failed

    @classmethod
    def from_url(cls, url, clock, max_deliveries=5, start_wait=None):
        """The queue for a parsed amqp[s]:// url (transferd.config.QueueURL)."""
        return cls(AMQPSettings(url), clock, max_deliveries=max_deliveries, start_wait=start_wait)

    @property
    def connected(self):
        """True while publishing is possible."""
        return self._publisher is not None and self._publisher.is_open

    @property
    def connection_name(self):
        return self.settings.connection_name

    def queue_name(self, name):
        """The broker's name for one of our queues."""
        if name not in self._names:
            raise ValueError(f"unknown queue {name!r} (known: {', '.join(self._names)})")
        return f"{self.prefix}.{name}"

    # -- IJobQueue --------------------------------------------------------

    def publish(self, queue, job_id):
        """Fire once RabbitMQ confirmed the message; fail at once when it is not connected."""
        try:
            routing_key = self.queue_name(queue)
        except ValueError:
            return defer.fail()
        return self._publish(routing_key, job_id, {})

    def publish_many(self, queue, job_ids):
        """Publish every message at once, then wait for all the confirms (RabbitMQ confirms many in one frame)."""
        try:
            routing_key = self.queue_name(queue)
        except ValueError:
            return defer.fail()
        confirms = [self._publish(routing_key, job_id, {}) for job_id in job_ids]
        return defer.gatherResults(confirms, consumeErrors=True).addCallbacks(
            lambda _: None, lambda failure: failure.value.subFailure)

    async def publish_event(self, exchange, routing_key, body, message_id):
        """Publish an event (JSON bytes) to a durable topic exchange, persistent; return once RabbitMQ confirmed it.

        Not mandatory: an exchange no queue is bound to takes the event and drops it.
        """
        channel, connection = self._publisher, self._connection
        if channel is None or not channel.is_open:
            raise QueueUnavailable("RabbitMQ is not connected")
        if self._blocked is not None:
            raise QueueUnavailable(f"RabbitMQ blocks publishers ({self._blocked})")
        if self._exchanges[0] is not connection:
            self._exchanges = (connection, set())
        declared = self._exchanges[1]
        properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                          content_type="application/json", message_id=message_id)
        try:
            if exchange not in declared:
                await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
                declared.add(exchange)
            await channel.basic_publish(exchange, routing_key, body, properties)
        except pika.exceptions.NackError:
            raise PublishRefused(f"RabbitMQ refused event {message_id} for exchange {exchange} (nack)") from None
        except pika.exceptions.AMQPError as error:
            raise QueueUnavailable(f"RabbitMQ did not confirm event {message_id}: {_describe(error)}") from None

    def consume(self, queue, handler, prefetch, on_dead_letter):
        """Register handler for queue, on this and every later connection.

        A second call replaces the handler at once; a new prefetch applies
        from the next connection (RabbitMQ keeps a running consumer's prefetch).
        """
        self.queue_name(queue)  # unknown names fail here, not on the next connection
        consumer = self._consumers.get(queue)
        if consumer is None:
            consumer = self._consumers[queue] = _Consumer(queue, handler, prefetch, on_dead_letter)
        consumer.handler, consumer.prefetch, consumer.on_dead_letter = handler, prefetch, on_dead_letter
        if self._connection is not None:
            self._start_consumer(self._connection, consumer)

    # -- service ----------------------------------------------------------

    def stop_consuming(self):
        """Hand no more messages to the handlers: cancel the consumers; the messages received and not handled
        go back to the queue at once (rejected), for other daemons.  Those being handled finish."""
        self._delivering = False
        for consumer in self._consumers.values():
            channel, tag = consumer.channel, consumer.tag
            consumer.channel = consumer.tag = consumer.connection = None
            if channel is not None and channel.is_open:
                try:
                    channel.basic_cancel(tag).addErrback(lambda _: None)
                except Exception:  # the channel is closing: its messages go back with it
                    pass

    def resume_consuming(self):
        """Consume again after stop_consuming (an undrained daemon)."""
        self._delivering = True
        if self._connection is not None and self.running:
            for consumer in self._consumers.values():
                self._start_consumer(self._connection, consumer)

    def startService(self):
        super().startService()
        self._closing = False
        self._delivering = True
        if self.start_wait is None:
            self._client.startService()
            return None
        self._first_connection = defer.Deferred()
        self._client.startService()
        return defer.Deferred.fromCoroutine(self._wait_for_broker())

    async def _wait_for_broker(self):
        """Fire once the first connection is set up; fail after start_wait seconds without one."""
        connected = self._first_connection
        timer = self.clock.callLater(self.start_wait, lambda: connected.called or connected.cancel())
        try:
            await connected
        except defer.CancelledError:
            raise QueueUnavailable(
                f"RabbitMQ at {self.settings.describe()} did not come up within {self.start_wait:g}s"
                f" ([startup] wait_for_backends): {self._last_failure or 'no connection'}"
            ) from None
        finally:
            self._first_connection = None
            if timer.active():
                timer.cancel()

    def _connect_failed(self, reason):
        """A TCP connection to the broker failed: while start-up waits for it, say so."""
        self._last_failure = _describe(reason)
        if self._first_connection is not None:
            self.log.warn("waiting for RabbitMQ at {broker}: {error}", broker=self.settings.describe(),
                          error=self._last_failure)

    def stopService(self):
        """Stop taking messages, wait (bounded) for running handlers, then close the connection cleanly."""
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        if self._first_connection is not None:
            self._first_connection.cancel()  # stopped while start-up waited for the broker
        await _bounded(defer.DeferredList(list(self._in_flight)), self.stop_timeout, self.clock)
        self._closing = True
        connection = self._connection
        if connection is not None and connection.is_open:
            closed = connection.close()  # fires once the TCP connection is gone
            if closed is not None:
                await _bounded(closed, 5.0, self.clock)
        if self._client.running:  # a second stopService must not re-enter ClientService
            await self._client.stopService()

    # -- connection life cycle ----------------------------------------------

    def _retry_after(self, attempt):
        """Back off on failed handshakes too: ClientService counts only failed TCP connects."""
        return self._backoff(max(attempt, self._failed_setups))

    def _new_connection(self):
        # Setting up is not ClientService's prepareConnection: a connection lost
        # while preparing crashes ClientService's state machine (NoTransition).
        connection = TwistedProtocolConnection(self.settings.parameters, custom_reactor=self.clock)
        defer.Deferred.fromCoroutine(self._set_up(connection, connection.ready))
        return connection

    async def _set_up(self, connection, ready):
        """Declare the topology, enable confirms, then publish and consume on this connection."""
        try:
            try:
                await ready
            except pika.exceptions.AMQPConnectionError:
                raise QueueUnavailable(
                    "RabbitMQ refused the AMQP handshake (check user, password and vhost in the queue url)"
                ) from None
            publisher = await connection.channel()
            for name in self._names:
                await publisher.queue_declare(self.queue_name(name), durable=True)
                await publisher.queue_declare(self.queue_name(name) + DEAD_SUFFIX, durable=True)
            await publisher.confirm_delivery()
            if not connection.is_open or connection.closed is None:
                raise QueueUnavailable("the connection closed while it was being set up")
        except Exception as error:
            self._failed_setups += 1
            self._last_failure = _describe(error)
            if self.running:
                self.log.warn(
                    "could not set up the connection to RabbitMQ at {broker}: {error}",
                    broker=self.settings.describe(), error=_describe(error),
                )
            if connection.transport is not None:
                connection.transport.loseConnection()
            return
        if not self.running:
            connection.close()
            return
        self._failed_setups = 0
        self._connection, self._publisher, self._blocked = connection, publisher, None
        connection.closed.addCallback(self._connection_closed, connection)
        publisher.on_closed.addCallback(
            lambda reason: self._rebuild(connection, f"the publishing channel closed: {_describe(reason)}")
        )
        self._watch_blocked(connection)
        if self._lost_at is None:
            self.log.info("connected to RabbitMQ at {broker}", broker=self.settings.describe())
        else:
            self.log.info(
                "RabbitMQ at {broker} is back after {down:.1f}s; publishing and consuming again",
                broker=self.settings.describe(), down=self.clock.seconds() - self._lost_at,
            )
            self._lost_at = None
        for consumer in list(self._consumers.values()):
            self._start_consumer(connection, consumer)
        if self._first_connection is not None and not self._first_connection.called:
            self._first_connection.callback(None)

    def _watch_blocked(self, connection):
        """Fail publishes at once while the broker blocks publishers (memory or disk alarm)."""
        impl = getattr(connection, "_impl", None)  # pika's Connection; the adapter does not forward these
        if impl is None:
            return

        def blocked(_connection, frame):
            if connection is self._connection:
                self._blocked = frame.method.reason or "resource alarm"
                self.log.warn("RabbitMQ blocks publishers: {reason}", reason=self._blocked)

        def unblocked(_connection, _frame):
            if connection is self._connection:
                self._blocked = None
                self.log.info("RabbitMQ accepts publishers again")

        impl.add_on_connection_blocked_callback(blocked)
        impl.add_on_connection_unblocked_callback(unblocked)

    def _connection_closed(self, reason, connection):
        if connection is not self._connection:
            return
        self._connection = self._publisher = None
        if self._closing or not self.running:
            self.log.info("closed the connection to RabbitMQ at {broker}", broker=self.settings.describe())
            return
        self._lost_at = self.clock.seconds()
        self.log.warn(
            "RabbitMQ at {broker} went away ({reason}); reconnecting; publishing fails meanwhile",
            broker=self.settings.describe(), reason=_describe(reason),
        )

    def _rebuild(self, connection, why):
        """A channel or consumer died while its connection lives on: drop the connection, set all up anew."""
        if connection is self._connection and connection.is_open and self.running and not self._closing:
            self.log.warn("{why}; reconnecting to RabbitMQ", why=why)
            connection.transport.loseConnection()

    # -- publishing -------------------------------------------------------

    def _publish(self, routing_key, job_id, headers):
        channel = self._publisher
        if channel is None or not channel.is_open:
            return defer.fail(QueueUnavailable("RabbitMQ is not connected"))
        if self._blocked is not None:
            return defer.fail(QueueUnavailable(f"RabbitMQ blocks publishers ({self._blocked})"))
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="text/plain",
            headers=headers or None,
        )
        try:
            d = channel.basic_publish("", routing_key, job_id.encode("utf-8"), properties, mandatory=True)
        except pika.exceptions.AMQPError as error:
            return defer.fail(QueueUnavailable(f"RabbitMQ is not connected: {_describe(error)}"))
        d.addCallbacks(lambda _: None, self._publish_failed, errbackArgs=(routing_key, job_id))
        return d

    def _publish_failed(self, failure, routing_key, job_id):
        error = failure.value
        if isinstance(error, pika.exceptions.NackError):
            raise PublishRefused(f"RabbitMQ refused job {job_id} for {routing_key} (nack)")
        if isinstance(error, pika.exceptions.UnroutableError):
            raise PublishRefused(f"RabbitMQ returned job {job_id}: no queue {routing_key}")
        if isinstance(error, pika.exceptions.AMQPError):
            raise QueueUnavailable(
                f"the connection to RabbitMQ was lost before it confirmed job {job_id}: {_describe(error)}"
            )
        return failure

    # -- consuming --------------------------------------------------------

    def _start_consumer(self, connection, consumer):
        if consumer.connection is connection or not self._delivering:  # resume_consuming starts it later
            return
        consumer.connection = connection
        defer.Deferred.fromCoroutine(self._consume(connection, consumer))

    async def _consume(self, connection, consumer):
        """Open a channel with the consumer's prefetch and hand each message to its handler."""
        try:
            channel = await connection.channel()
            await channel.basic_qos(prefetch_count=consumer.prefetch)
            messages, tag = await channel.basic_consume(self.queue_name(consumer.name), auto_ack=False)
        except Exception as error:
            self._rebuild(connection, f"could not consume {consumer.name}: {_describe(error)}")
            return
        if consumer.connection is not connection:  # stop_consuming came meanwhile
            channel.basic_cancel(tag).addErrback(lambda _: None)
        else:
            consumer.channel, consumer.tag = channel, tag
        while True:
            try:
                message = await messages.get()
            except Exception as error:  # channel closed or consumer cancelled
                if not self._delivering and channel.is_open:  # cancelled by stop_consuming
                    for message in list(messages.pending):  # received, never handed: back to the queue
                        _reject(message)
                    del messages.pending[:]
                    return
                self._rebuild(connection, f"the consumer of {consumer.name} stopped: {_describe(error)}")
                return
            if self.running and self._delivering:
                d = defer.Deferred.fromCoroutine(self._process(consumer, message))
                self._in_flight.add(d)
                d.addBoth(self._processed, d)
            else:  # arrived before the cancel was through: back to the queue, for the other daemons
                _reject(message)

    def _processed(self, result, d):
        self._in_flight.discard(d)
        return result

    async def _process(self, consumer, message):
        """Run the handler; ack on success, requeue with a count or dead-letter on failure."""
        job_id = message.body.decode("utf-8", "replace")
        deliveries = _deliveries(message)
        try:
            await defer.maybeDeferred(consumer.handler, job_id)
        except Exception as error:
            await self._handler_failed(consumer, message, job_id, deliveries, error)
        else:
            _ack(message)

    async def _handler_failed(self, consumer, message, job_id, deliveries, error):
        name, routing_key = consumer.name, self.queue_name(consumer.name)
        try:
            if isinstance(error, StoreUnavailable):
                # Our own database is away: no fault of the job; the copy keeps the count it had.
                await task.deferLater(self.clock, self.retry_delay, lambda: None)
                if not message.channel.is_open:
                    return
                await self._publish(routing_key, job_id, {DELIVERIES_HEADER: deliveries - 1} if deliveries > 1 else {})
            elif deliveries < self.max_deliveries:
                self.log.warn(
                    "job {job_id}: {queue} handler failed (delivery {n} of {max}), retrying: {error}",
                    job_id=job_id, queue=name, n=deliveries, max=self.max_deliveries, error=_describe(error),
                )
                await task.deferLater(self.clock, self.retry_delay, lambda: None)
                if not message.channel.is_open:
                    return  # the broker delivers the original again
                await self._publish(routing_key, job_id, {DELIVERIES_HEADER: deliveries})
            else:
                reason = f"failed {deliveries} times in the {name} step: {_describe(error)}"
                await self._publish(
                    routing_key + DEAD_SUFFIX, job_id, {DELIVERIES_HEADER: deliveries, REASON_HEADER: reason}
                )
                self.log.error(
                    "job {job_id}: dead-lettered to {dead}: {reason}",
                    job_id=job_id, dead=routing_key + DEAD_SUFFIX, reason=reason,
                )
                try:
                    await defer.maybeDeferred(consumer.on_dead_letter, name, job_id, reason)
                except Exception:
                    self.log.failure("job {job_id}: the dead-letter handler failed", job_id=job_id)
        except QueueUnavailable as requeue_error:
            self.log.info(
                "job {job_id}: not requeued ({error}); RabbitMQ will deliver it again",
                job_id=job_id, error=_describe(requeue_error),
            )
            return
        except PublishRefused as requeue_error:
            # A deleted queue or a broker in trouble: declaring everything
            # again on a new connection mends the one, backs off from the other.
            why = f"job {job_id} could not be requeued: {_describe(requeue_error)}"
            self._rebuild(consumer.connection, why)
            return
        except Exception:
            self.log.failure("job {job_id}: could not requeue it", job_id=job_id)
            return
        _ack(message)


def _deliveries(message):
    """This delivery's number: the failed deliveries counted in the header, plus this one.

    A delivery cut short by a lost connection is not counted: the broker
    redelivers the message unchanged.
    """
    headers = message.properties.headers or {}
    try:
        return int(headers.get(DELIVERIES_HEADER, 0)) + 1
    except (TypeError, ValueError):
        return 1


def _ack(message):
    """Ack a message on the channel it came from, if that channel still lives."""
    channel = message.channel
    if channel.is_open:  # otherwise its delivery tag died with the channel; the broker delivers it again
        channel.basic_ack(message.method.delivery_tag)


def _reject(message):
    """Give a message back to its queue unhandled (a drained daemon), if its channel still lives."""
    channel = message.channel
    if channel.is_open:
        channel.basic_reject(message.method.delivery_tag, requeue=True)


def _describe(error):
    if isinstance(error, defer.Failure):
        error = error.value
    return str(error) or type(error).__name__


def _bounded(d, seconds, clock):
    """Fire when d fires or after seconds, whichever comes first, without cancelling d."""
    result = defer.Deferred()
    timer = clock.callLater(seconds, result.callback, None)

    def finished(outcome):
        if timer.active():
            timer.cancel()
            result.callback(None)
        return None

    d.addBoth(finished)
    return result
