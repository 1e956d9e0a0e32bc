"""The JobQueue contract: every IJobQueue implementation must pass these.

A concrete test case mixes JobQueueContract into trial's TestCase and provides
make_queue(max_deliveries), returning a started queue service whose queue
names are private to the test, and may set redelivery_wait (seconds).
"""

from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from transferd.interfaces import IJobQueue, StoreUnavailable
from tests.support import wait_for


def NO_DEAD_LETTERS(queue, job_id, reason):
    raise AssertionError(f"{job_id} was dead-lettered from {queue}: {reason}")


class JobQueueContract:
    redelivery_wait = 10.0

    def make_queue(self, max_deliveries):
        raise NotImplementedError

    @defer.inlineCallbacks
    def _queue(self, max_deliveries=3):
        queue = yield self.make_queue(max_deliveries)
        self.addCleanup(queue.stopService)
        return queue

    @defer.inlineCallbacks
    def test_provides_interface(self):
        """The queue provides IJobQueue."""
        queue = yield self._queue()
        self.assertTrue(verifyObject(IJobQueue, queue))

    @defer.inlineCallbacks
    def test_published_ids_are_delivered(self):
        """Every published job id reaches the consumer of its queue, and only that one."""
        queue = yield self._queue()
        seen, other = [], []
        queue.consume("staging", lambda job_id: seen.append(job_id), 4, NO_DEAD_LETTERS)
        queue.consume("transfer", lambda job_id: other.append(job_id), 4, NO_DEAD_LETTERS)
        for i in range(20):
            yield queue.publish("staging", f"job-{i}")
        yield wait_for(lambda: len(seen) == 20, self.redelivery_wait)
        self.assertEqual(sorted(seen), sorted(f"job-{i}" for i in range(20)))
        self.assertEqual(other, [])

    @defer.inlineCallbacks
    def test_published_before_consumer_waits(self):
        """A job id published before anyone consumes is delivered once a consumer appears."""
        queue = yield self._queue()
        yield queue.publish("staging", "early")
        seen = []
        queue.consume("staging", seen.append, 1, NO_DEAD_LETTERS)
        yield wait_for(lambda: seen == ["early"], self.redelivery_wait)

    @defer.inlineCallbacks
    def test_prefetch_bounds_concurrency(self):
        """No more than prefetch handlers run at once."""
        queue = yield self._queue()
        running, peak, done = [0], [0], []

        @defer.inlineCallbacks
        def handler(job_id):
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            yield task.deferLater(reactor, 0.05, lambda: None)
            running[0] -= 1
            done.append(job_id)

        queue.consume("staging", handler, 3, NO_DEAD_LETTERS)
        for i in range(12):
            yield queue.publish("staging", f"job-{i}")
        yield wait_for(lambda: len(done) == 12, self.redelivery_wait)
        self.assertEqual(peak[0], 3)

    @defer.inlineCallbacks
    def test_failed_handler_redelivers_then_dead_letters(self):
        """A handler failure redelivers the id; after max_deliveries it is dead-lettered once."""
        queue = yield self._queue(max_deliveries=3)
        attempts, dead = [], []
        on_dead = lambda name, job_id, reason: dead.append((name, job_id, reason))  # noqa: E731

        def handler(job_id):
            attempts.append(job_id)
            raise RuntimeError("boom")

        queue.consume("staging", handler, 1, on_dead)
        yield queue.publish("staging", "bad")
        yield wait_for(lambda: dead, self.redelivery_wait * 3)
        self.assertEqual(attempts, ["bad"] * 3)
        self.assertEqual(dead[0][:2], ("staging", "bad"))
        self.assertIn("boom", dead[0][2])
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(attempts), 3)

    @defer.inlineCallbacks
    def test_success_after_failure_acks(self):
        """A message whose handler succeeds on a redelivery is not delivered again."""
        queue = yield self._queue(max_deliveries=5)
        attempts = []

        def handler(job_id):
            attempts.append(job_id)
            if len(attempts) == 1:
                return defer.fail(RuntimeError("transient"))

        queue.consume("staging", handler, 1, NO_DEAD_LETTERS)
        yield queue.publish("staging", "flaky")
        yield wait_for(lambda: len(attempts) == 2, self.redelivery_wait * 2)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(attempts, ["flaky", "flaky"])

    @defer.inlineCallbacks
    def test_store_outage_does_not_count(self):
        """When a handler fails because the job store is away, more often than max_deliveries, it is not dead-lettered."""
        queue = yield self._queue(max_deliveries=2)
        attempts = []

        def handler(job_id):
            attempts.append(job_id)
            if len(attempts) <= 4:
                raise StoreUnavailable("the database at db:3306/transferd is unreachable")

        queue.consume("staging", handler, 1, NO_DEAD_LETTERS)
        yield queue.publish("staging", "waits-for-the-store")
        yield wait_for(lambda: len(attempts) == 5, self.redelivery_wait * 5)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(attempts), 5)

    @defer.inlineCallbacks
    def test_publish_many_delivers_every_id(self):
        """publish_many() fires once every id is accepted, and each id reaches the consumer once."""
        queue = yield self._queue()
        seen = []
        queue.consume("staging", seen.append, 8, NO_DEAD_LETTERS)
        batch = [f"job-{i}" for i in range(100)]
        yield queue.publish_many("staging", batch)
        yield wait_for(lambda: len(seen) >= 100, self.redelivery_wait)
        self.assertEqual(sorted(seen), sorted(batch))
        yield queue.publish_many("staging", [])

    @defer.inlineCallbacks
    def test_stop_and_resume_consuming(self):
        """After stop_consuming no message reaches the handler; resume_consuming hands the waiting ones over."""
        queue = yield self._queue()
        seen = []
        queue.consume("staging", seen.append, 2, NO_DEAD_LETTERS)
        yield queue.publish("staging", "before")
        yield wait_for(lambda: seen == ["before"], self.redelivery_wait)
        queue.stop_consuming()
        for i in range(5):
            yield queue.publish("staging", f"drained-{i}")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(seen, ["before"])
        queue.resume_consuming()
        yield wait_for(lambda: len(seen) == 6, self.redelivery_wait)
        self.assertEqual(sorted(seen[1:]), [f"drained-{i}" for i in range(5)])
