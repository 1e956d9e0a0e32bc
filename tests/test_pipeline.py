"""The pipeline's rules: claims, re-staging, dead letters, the reconciler, cancellation."""

import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from transferd import jobs
from transferd.interfaces import IMover, IStager
from transferd.jobs import StageResult, TransferResult
from transferd.pipeline import Pipeline, Reconciler, authcode_matches
from transferd.queue import STAGING_QUEUE, TRANSFER_QUEUE
from transferd.queue.memory import MemoryJobQueue
from transferd.store.sqlite import SQLiteJobStore
from tests.support import wait_for


@implementer(IStager)
class ScriptedStager:
    """A stager whose answers the test chooses: a StageResult, None (reports later) or an exception."""

    timeout = 100.0
    max_attempts = 2

    def __init__(self):
        self.answer = StageResult(success=True, staged_to="host", path="/staged/p")
        self.calls, self.cancelled, self.released = [], [], []

    def check(self, product_id):
        return defer.succeed(None)

    def stage(self, job, authcode):
        self.calls.append((job.job_id, authcode))
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)

    def cancel(self, job):
        self.cancelled.append(job.job_id)
        return defer.succeed(None)

    def release(self, job):
        self.released.append(job.job_id)
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)


@implementer(IMover)
class ScriptedMover:
    schemes = frozenset({"file"})
    asynchronous = False
    timeout = None

    def __init__(self):
        self.answer = TransferResult(success=True, msg="done")
        self.calls = []

    def transfer(self, job):
        self.calls.append(job.job_id)
        return defer.succeed(self.answer)

    def cancel(self, job):
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)


class PipelineTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        path = os.path.abspath(self.mktemp())
        self.store = SQLiteJobStore.from_url("sqlite:///" + path, self.clock)
        yield self.store.migrate()
        self.queue = MemoryJobQueue(reactor, max_deliveries=2, retry_delay=0.01)
        self.stager, self.mover = ScriptedStager(), ScriptedMover()
        self.pipeline = Pipeline(self.store, self.queue, self.stager, self.mover, self.clock, lease=10, requeue_after=60)
        self.reconciler = Reconciler(self.store, self.pipeline)
        self.queue.startService()
        self.addCleanup(self.store.close)
        self.addCleanup(self.queue.stopService)

    @defer.inlineCallbacks
    def submitted(self):
        job = jobs.Job(job_id=jobs.new_job_id(), product_id="p", destination_path="file:///d")
        yield self.pipeline.submit(job)
        yield self.pipeline.flush_holds()
        return job.job_id

    def status(self, job_id):
        return self.store.get(job_id).addCallback(lambda job: job.status)

    @defer.inlineCallbacks
    def test_in_line_stager_and_mover_reach_success(self):
        """With workers consuming, a job runs SUBMITTED to SUCCESS, and the staged copy is released."""
        self.pipeline.startService()
        self.addCleanup(self.pipeline.stopService)
        job_id = yield self.submitted()
        yield wait_for(lambda: self.status(job_id).addCallback(lambda s: s == jobs.SUCCESS))
        job = yield self.store.get(job_id)
        self.assertEqual((job.stager_path, job.stage_attempts, job.lease_owner), ("/staged/p", 1, None))
        self.assertEqual(self.stager.released, [job_id])

    @defer.inlineCallbacks
    def test_asynchronous_stager_holds_until_timeout_then_restages_with_new_code(self):
        """A stager that reports later holds the job for its timeout; then the job is staged again with a new authcode."""
        self.stager.answer = None
        job_id = yield self.submitted()
        yield self.pipeline.stage(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.lease_owner, job.lease_until), (jobs.STAGING, None, self.clock.seconds() + 100))
        self.assertTrue(authcode_matches(self.stager.calls[0][1], job.stager_callback))
        self.assertEqual((yield self.reconciler.run_once()), 0)
        self.clock.advance(101)
        self.assertEqual((yield self.reconciler.run_once()), 1)
        yield self.pipeline.stage(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual(job.stage_attempts, 2)
        self.assertNotEqual(self.stager.calls[0][1], self.stager.calls[1][1])
        self.assertFalse(authcode_matches(self.stager.calls[0][1], job.stager_callback))
        self.clock.advance(101)
        yield self.pipeline.stage(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual(job.status, jobs.ERROR)
        self.assertIn("staging timed out after 2 attempt(s)", job.detailed_status)

    @defer.inlineCallbacks
    def test_duplicate_message_does_not_stage_twice(self):
        """A second message for a job another worker holds is dropped without calling the stager."""
        job_id = yield self.submitted()
        yield self.store.claim(job_id, jobs.SUBMITTED, "other-daemon", 10)
        yield self.pipeline.stage(job_id)
        self.assertEqual(self.stager.calls, [])
        self.assertEqual((yield self.status(job_id)), jobs.SUBMITTED)

    @defer.inlineCallbacks
    def test_failed_staging_is_error_with_reason(self):
        """A stager failure ends the job in ERROR with the stager's message."""
        self.stager.answer = StageResult(success=False, msg="tape 42 unreadable")
        job_id = yield self.submitted()
        yield self.pipeline.stage(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual(job.status, jobs.ERROR)
        self.assertEqual(job.detailed_status, "staging failed: tape 42 unreadable")

    @defer.inlineCallbacks
    def test_repeated_exceptions_dead_letter_to_error(self):
        """A step that keeps raising is dead-lettered and its job ends in ERROR saying why."""
        self.stager.answer = RuntimeError("stager exploded")
        self.pipeline.startService()
        self.addCleanup(self.pipeline.stopService)
        job_id = yield self.submitted()
        yield wait_for(lambda: self.status(job_id).addCallback(lambda s: s == jobs.ERROR))
        job = yield self.store.get(job_id)
        self.assertIn("stager exploded", job.detailed_status)
        self.assertEqual(len(self.stager.calls), 2)
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_reconciler_redrives_every_unheld_state(self):
        """The reconciler re-publishes SUBMITTED and STAGING jobs to staging, STAGED and TRANSFERRING to transfer."""
        published = []
        self.queue.publish = lambda queue, job_id: published.append((queue, job_id)) or defer.succeed(None)
        ids = {}
        for state in (jobs.SUBMITTED, jobs.STAGING, jobs.STAGED, jobs.TRANSFERRING):
            ids[state] = yield self.submitted()
        yield self.store.transition(ids[jobs.STAGING], jobs.SUBMITTED, jobs.STAGING)
        for job_id in (ids[jobs.STAGED], ids[jobs.TRANSFERRING]):
            yield self.store.transition(job_id, jobs.SUBMITTED, jobs.STAGING)
            yield self.store.transition(job_id, jobs.STAGING, jobs.STAGED)
        yield self.store.transition(ids[jobs.TRANSFERRING], jobs.STAGED, jobs.TRANSFERRING)
        published.clear()
        self.clock.advance(61)  # the QUEUED holds of submission expire
        self.assertEqual((yield self.reconciler.run_once()), 4)
        self.assertEqual(sorted(published), sorted([
            (STAGING_QUEUE, ids[jobs.SUBMITTED]), (STAGING_QUEUE, ids[jobs.STAGING]),
            (TRANSFER_QUEUE, ids[jobs.STAGED]), (TRANSFER_QUEUE, ids[jobs.TRANSFERRING]),
        ]))
        self.assertEqual((yield self.reconciler.run_once()), 0)

    @defer.inlineCallbacks
    def test_failed_publish_leaves_job_for_reconciler(self):
        """When the queue refuses a new job, the job stays committed and the next reconciler pass queues it."""
        self.queue.publish = lambda queue, job_id: defer.fail(ConnectionError("broker down"))
        job_id = yield self.submitted()
        self.assertEqual((yield self.status(job_id)), jobs.SUBMITTED)
        del self.queue.publish
        self.assertEqual((yield self.reconciler.run_once()), 1)

    @defer.inlineCallbacks
    def test_dead_worker_lease_expires_and_job_is_redriven(self):
        """A job leased by a worker that died is re-driven once the lease expires, not before."""
        job_id = yield self.submitted()
        yield self.store.claim(job_id, jobs.SUBMITTED, "dead-worker", 10)
        self.assertEqual((yield self.reconciler.run_once()), 0)
        self.clock.advance(11)
        self.assertEqual((yield self.reconciler.run_once()), 1)

    @defer.inlineCallbacks
    def test_transfer_failure_is_error(self):
        """A mover failure ends the job in ERROR with the mover's message."""
        self.mover.answer = TransferResult(success=False, msg="403 Forbidden on PUT")
        job_id = yield self.submitted()
        yield self.pipeline.stage(job_id)
        yield self.pipeline.transfer(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.detailed_status), (jobs.ERROR, "transfer failed: 403 Forbidden on PUT"))

    @defer.inlineCallbacks
    def test_cancel_while_staging_tells_stager(self):
        """Cancelling a STAGING job tells the stager and releases the staged copy."""
        self.stager.answer = None
        job_id = yield self.submitted()
        yield self.pipeline.stage(job_id)
        yield self.pipeline.cancel(job_id)
        self.assertEqual((yield self.status(job_id)), jobs.CANCELLED)
        self.assertEqual((self.stager.cancelled, self.stager.released), ([job_id], [job_id]))

    @defer.inlineCallbacks
    def test_unconfirmed_publish_holds_only_one_lease(self):
        """A job whose message was never confirmed (the daemon died) is re-driven after one lease, not requeue_after."""
        self.queue.publish = lambda queue, job_id: defer.Deferred()  # the broker never confirms
        job = jobs.Job(job_id=jobs.new_job_id(), product_id="p", destination_path="file:///d")
        defer.ensureDeferred(self.pipeline.submit(job))
        yield wait_for(lambda: self.store.get(job.job_id))
        del self.queue.publish
        self.assertEqual((yield self.reconciler.run_once()), 0)
        self.clock.advance(11)
        self.assertEqual((yield self.reconciler.run_once()), 1)

    @defer.inlineCallbacks
    def test_confirmed_publish_extends_hold(self):
        """Once the queue accepted a job's message, the reconciler leaves it alone for requeue_after."""
        job_id = yield self.submitted()
        self.clock.advance(11)
        self.assertEqual((yield self.reconciler.run_once()), 0)
        self.clock.advance(50)
        self.assertEqual((yield self.reconciler.run_once()), 1)

    @defer.inlineCallbacks
    def staged(self):
        job_id = yield self.submitted()
        yield self.pipeline.stage(job_id)
        self.assertEqual((yield self.status(job_id)), jobs.STAGED)
        return job_id

    @defer.inlineCallbacks
    def test_asynchronous_mover_accepted_job_is_transferring_until_timeout(self):
        """A job an asynchronous mover accepted is TRANSFERRING, left to its poller for the mover's timeout."""
        self.mover.asynchronous, self.mover.timeout, self.mover.answer = True, 500.0, None
        job_id = yield self.staged()
        yield self.pipeline.transfer(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.lease_owner, job.lease_until), (jobs.TRANSFERRING, None, self.clock.seconds() + 500))
        self.clock.advance(501)
        yield self.pipeline.transfer(job_id)  # re-driven after the hold: submitted again (idempotently)
        self.assertEqual(self.mover.calls, [job_id, job_id])
        self.assertEqual((yield self.status(job_id)), jobs.TRANSFERRING)

    @defer.inlineCallbacks
    def test_asynchronous_mover_down_leaves_job_staged(self):
        """When an asynchronous mover cannot submit (service down), the job stays STAGED for a retry."""
        self.mover.asynchronous, self.mover.timeout = True, 500.0
        self.mover.transfer = lambda job: defer.fail(ConnectionRefusedError("FTS down"))
        job_id = yield self.staged()
        yield self.assertFailure(defer.ensureDeferred(self.pipeline.transfer(job_id)), ConnectionRefusedError)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.lease_owner), (jobs.STAGED, None))

    @defer.inlineCallbacks
    def test_asynchronous_mover_refusal_is_error(self):
        """A submission the mover refuses for good ends the job in ERROR with the reason."""
        self.mover.asynchronous, self.mover.timeout = True, 500.0
        self.mover.answer = TransferResult(success=False, msg="FTS refused the job: bad destination")
        job_id = yield self.staged()
        yield self.pipeline.transfer(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual(job.status, jobs.ERROR)
        self.assertIn("bad destination", job.detailed_status)

    @defer.inlineCallbacks
    def test_transfer_service_away_is_not_a_job_failure(self):
        """An asynchronous mover's 'try later' leaves the job STAGED, held that long, and uses no delivery."""
        self.mover.asynchronous, self.mover.timeout = True, 500.0
        away = ConnectionRefusedError("FTS down")
        away.retry_later = 30.0
        self.mover.transfer = lambda job: defer.fail(away)
        job_id = yield self.staged()
        yield self.pipeline.transfer(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.lease_owner, job.lease_until), (jobs.STAGED, None, self.clock.seconds() + 30))
