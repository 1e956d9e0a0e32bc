"""The embedded JobQueue: in-process, nothing survives a restart (the reconciler re-drives).

A failed delivery is tried again after retry_delay, up to max_deliveries in
all, then dead-lettered; one that failed because the job store is away
(StoreUnavailable) is tried again without being counted.
"""

import collections

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from transferd.interfaces import IJobQueue, StoreUnavailable


class _Queue:
    def __init__(self):
        self.waiting = collections.deque()  # of (job_id, deliveries so far)
        self.handler = None
        self.on_dead_letter = None
        self.prefetch = 1
        self.in_flight = 0


@implementer(IJobQueue)
class MemoryJobQueue(Service):
    """Job ids in deques, delivered to one handler per queue with bounded concurrency."""

    log = Logger()
    durable = False
    connected = True  # publishing always succeeds (IJobQueue.connected)

    def __init__(self, clock, max_deliveries=5, retry_delay=1.0):
        self.clock = clock
        self.max_deliveries = max_deliveries
        self.retry_delay = retry_delay
        self._queues = collections.defaultdict(_Queue)
        self._running_handlers = set()
        self._delivering = True  # False once stop_consuming() was called
        self._retries = set()  # delayed redeliveries not yet due
        self._idle = []  # Deferreds waiting for idle()

    def publish(self, queue, job_id):
        return self.publish_many(queue, [job_id])

    def publish_many(self, queue, job_ids):
        self._queues[queue].waiting.extend((job_id, 0) for job_id in job_ids)
        self._pump(queue)
        return defer.succeed(None)

    def consume(self, queue, handler, prefetch, on_dead_letter):
        q = self._queues[queue]
        q.handler, q.prefetch, q.on_dead_letter = handler, prefetch, on_dead_letter
        self._pump(queue)

    def idle(self):
        """Fire once no message waits and none is being handled (for tests).

        Tests wait on this instead of polling: it fires as soon as the work
        that messages caused is done.  A redelivery still to come (after
        retry_delay on the clock) does not count as work.
        """
        d = defer.Deferred()
        self._idle.append(d)
        self._check_idle()
        return d

    def _check_idle(self):
        busy = self._running_handlers or any(
            q.waiting and q.handler for q in self._queues.values())
        if not busy:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def stop_consuming(self):
        """Hand no more messages to the handlers (they stay queued; an in-process queue loses them at exit)."""
        self._delivering = False

    def resume_consuming(self):
        self._delivering = True
        for name in list(self._queues):
            self._pump(name)

    def startService(self):
        super().startService()
        self._delivering = True
        for name in list(self._queues):
            self._pump(name)

    def stopService(self):
        """Stop delivering; wait for the handlers already running."""
        super().stopService()
        for retry in self._retries:
            retry.cancel()
        self._retries.clear()
        return defer.DeferredList(list(self._running_handlers))

    def _pump(self, name):
        q = self._queues[name]
        while self.running and self._delivering and q.handler and q.waiting and q.in_flight < q.prefetch:
            job_id, deliveries = q.waiting.popleft()
            q.in_flight += 1
            d = defer.maybeDeferred(q.handler, job_id)
            self._running_handlers.add(d)
            d.addBoth(self._settled, d, name, job_id, deliveries + 1)

    def _settled(self, outcome, d, name, job_id, deliveries):
        self._running_handlers.discard(d)
        q = self._queues[name]
        q.in_flight -= 1
        if isinstance(outcome, defer.Failure):
            self._failed(name, job_id, deliveries, outcome)
        self._pump(name)
        self._check_idle()

    def _failed(self, name, job_id, deliveries, failure):
        if failure.check(StoreUnavailable):
            # Our own database is away: no fault of the job, so this delivery does not count.
            retry = self.clock.callLater(self.retry_delay, self._requeue, name, job_id, deliveries - 1)
            self._retries.add(retry)
            return
        if deliveries < self.max_deliveries:
            self.log.warn(
                "job {job_id}: {queue} handler failed (delivery {n}), retrying: {error}",
                job_id=job_id, queue=name, n=deliveries, error=failure.getErrorMessage(),
            )
            retry = self.clock.callLater(self.retry_delay, self._requeue, name, job_id, deliveries)
            self._retries.add(retry)
            return
        self.log.error(
            "job {job_id}: dead-lettered from {queue} after {n} deliveries: {error}",
            job_id=job_id, queue=name, n=deliveries, error=failure.getErrorMessage(),
        )
        reason = f"failed {deliveries} times in the {name} step: {failure.getErrorMessage()}"
        d = defer.maybeDeferred(self._queues[name].on_dead_letter, name, job_id, reason)
        d.addErrback(lambda f: self.log.failure("dead-letter handler failed", f))
        self._running_handlers.add(d)
        d.addBoth(self._dead_lettered, d)

    def _dead_lettered(self, result, d):
        self._running_handlers.discard(d)
        self._check_idle()

    def _requeue(self, name, job_id, deliveries):
        self._retries = {retry for retry in self._retries if retry.active()}
        self._queues[name].waiting.append((job_id, deliveries))
        self._pump(name)
        self._check_idle()
