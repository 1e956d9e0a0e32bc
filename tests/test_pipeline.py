"""The pipeline's rules: leases, re-staging, dead letters, the reconciler, cancellation.

The daemon is built by transferd.wiring with scripted backends; time is a
Clock, and tests.support.settled says when the work is done.
"""

import os
import sqlite3

from twisted.application.service import Service
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from transferd import jobs, leases, scheduler
from transferd.config import load_config
from transferd.interfaces import IMover, IStager, ServiceAway, StoreUnavailable
from transferd.jobs import StageResult, TransferResult
from transferd.pipeline import authcode_matches, hash_authcode
from transferd.queue import STAGING_QUEUE, TRANSFER_QUEUE
from transferd.wiring import build
from tests.support import settled, wait_for


@implementer(IStager)
class ScriptedStager(Service):
    """A stager whose answers the test chooses: a StageResult, None (reports later) or an exception."""

    timeout = 100.0
    max_attempts = 2
    give_up_after = 3600.0
    batch_size = 1

    def __init__(self):
        self.answer = StageResult(success=True, staged_to="host", path="/staged/p")
        self.calls, self.cancelled, self.released = [], [], []
        self.asked = defer.Deferred()  # fires at the first stage() call
        self.still = False  # what still_staging answers
        self.asked_still = []  # the jobs still_staging was asked about

    def check(self, product_id):
        return defer.succeed(None)

    def stage(self, job, authcode):
        self.calls.append((job.job_id, authcode))
        if not self.asked.called:
            self.asked.callback(None)
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        if isinstance(self.answer, defer.Deferred):
            return self.answer
        if callable(self.answer):
            return self.answer()  # a Deferred of its own for each call
        return defer.succeed(self.answer)

    def still_staging(self, job):
        self.asked_still.append(job)
        return defer.succeed(self.still)

    def cancel(self, job):
        self.cancelled.append(job.job_id)
        return defer.succeed(None)

    def free_copy(self, job):
        self.released.append(job.job_id)
        return defer.succeed(None)

    def pollers(self, outcomes):
        return []


@implementer(IMover)
class ScriptedMover(Service):
    schemes = frozenset({"file"})
    asynchronous = False
    timeout = None
    give_up_after = 7200.0

    def __init__(self):
        self.answer = TransferResult(success=True, msg="done")
        self.calls, self.cancelled = [], []

    def transfer(self, job):
        self.calls.append(job.job_id)
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)

    def cancel(self, job):
        self.cancelled.append(job)
        return defer.succeed(None)

    def pollers(self, outcomes):
        return []


class PipelineTestCase(unittest.TestCase):
    consume = False  # True: workers take the messages; False: the tests hand them to the pipeline

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "archive"))
        self.database = os.path.join(base, "jobs.sqlite")
        config = load_config(None, {
            ("api", "endpoint"): "tcp:0:interface=127.0.0.1",
            ("database", "url"): "sqlite:///" + self.database,
            ("queue", "max_deliveries"): "2",
            ("stager", "archive_root"): os.path.join(base, "archive"),
            ("stager", "staging_root"): os.path.join(base, "staging"),
            ("reconciler", "lease"): "10",
            ("reconciler", "requeue_after"): "60",
            ("reconciler", "interval"): "1e9",  # the tests run the reconciler themselves
        })
        self.stager, self.mover = ScriptedStager(), ScriptedMover()
        self.daemon = build(config, reactor, self.clock, stager=self.stager, mover=self.mover)
        self.store, self.queue = self.daemon.store, self.daemon.queue
        self.pipeline, self.reconciler = self.daemon.pipeline, self.daemon.reconciler
        if not self.consume:  # the tests run the scheduler's passes themselves
            self.pipeline.disownServiceParent()
            self.daemon.scheduler.disownServiceParent()
        self.daemon.startService()
        self.addCleanup(self.daemon.stopService)
        yield self.daemon.started

    @defer.inlineCallbacks
    def submitted(self):
        job = jobs.Job(job_id=jobs.new_job_id(), product_id="p", destination_path="file:///d")
        yield self.pipeline.submit(job)
        yield self.scheduled()
        return job.job_id

    @defer.inlineCallbacks
    def scheduled(self):
        """Run a scheduling pass of each step (the scheduler's timer runs on the test's clock) and confirm them."""
        released = []
        for step in scheduler.STEPS:
            released.append((yield self.daemon.scheduler.run_pass(step)))
        yield self.pipeline.flush_holds()
        return released

    def status(self, job_id):
        return self.store.get(job_id).addCallback(lambda job: job.status)


class PipelineTests(PipelineTestCase):
    timeout = 20
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
        self.assertEqual(self.stager.asked_still, [])  # a timed-out attempt is over: nobody died on it
        self.clock.advance(101)
        yield self.pipeline.stage(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual(job.status, jobs.ERROR)
        self.assertIn("staging timed out after 2 attempt(s)", job.detailed_status)

    @defer.inlineCallbacks
    def test_a_fresh_job_is_leased_and_starts_staging_in_one_store_call(self):
        """A job no worker took before: one store.claim leases it and moves it to STAGING (no take_lease, no
        transition of its own); the stager gets the authcode whose hash is stored; its history is as before."""
        job_id = yield self.submitted()
        called = []
        for name in ("claim", "take_lease", "transition", "update"):
            def spy(*args, _name=name, _real=getattr(self.store, name), **kwargs):
                called.append((_name, *args[1:3]) if _name == "transition" else (_name,))
                return _real(*args, **kwargs)
            setattr(self.store, name, spy)
        yield self.pipeline.stage(job_id)
        self.assertEqual(called, [("claim",)])
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.stage_attempts, job.deliveries, job.lease_owner),
                         (jobs.STAGED, 1, 0, None))
        self.assertTrue(authcode_matches(self.stager.calls[0][1], job.stager_callback))
        history = yield self.store.events(job_id)
        self.assertEqual([(e["old_status"], e["new_status"]) for e in history],
                         [(None, jobs.SUBMITTED), (jobs.SUBMITTED, jobs.STAGING), (jobs.STAGING, jobs.STAGED)])

    @defer.inlineCallbacks
    def test_a_fresh_job_waits_for_a_suspect_running_alone(self):
        """While a job a worker died on stages alone, a fresh job is not moved to STAGING: it waits without its
        lease, then stages as its first attempt."""
        suspect = yield self.submitted()
        yield self.store.take_lease(suspect, [jobs.SUBMITTED], "crashed", 10)
        self.clock.advance(11)  # that worker died
        fresh = yield self.submitted()
        staging = {}
        self.stager.answer = lambda: staging.setdefault(len(staging), defer.Deferred())
        first = defer.ensureDeferred(self.pipeline.stage(suspect))
        yield wait_for(lambda: len(staging) == 1)
        second = defer.ensureDeferred(self.pipeline.stage(fresh))
        yield wait_for(lambda: len(self.pipeline._isolation._waiting) == 1)
        job = yield self.store.get(fresh)
        self.assertEqual((job.status, job.lease_owner, job.deliveries), (jobs.SUBMITTED, None, 0))
        staging[0].callback(StageResult(success=True, staged_to="host", path="/staged/p"))
        yield first
        yield wait_for(lambda: len(staging) == 2)
        staging[1].callback(StageResult(success=True, staged_to="host", path="/staged/p"))
        yield second
        job = yield self.store.get(fresh)
        self.assertEqual((job.status, job.stage_attempts), (jobs.STAGED, 1))
        self.assertEqual([call[0] for call in self.stager.calls], [suspect, fresh])

    @defer.inlineCallbacks
    def accepted_by_a_worker_that_died(self):
        """A job a worker moved to STAGING with authcode "first", which the stager accepted; then the worker died."""
        job_id = yield self.submitted()
        yield self.store.take_lease(job_id, [jobs.SUBMITTED], "crashed", 10)
        yield self.store.transition(job_id, jobs.SUBMITTED, jobs.STAGING,
                                    {"stager_callback": hash_authcode("first"), "stage_attempts": 1},
                                    hold=leases.worker("crashed", 10), actor="crashed")
        self.clock.advance(11)  # it died: its lease runs out
        return job_id

    @defer.inlineCallbacks
    def test_a_job_the_stager_still_stages_after_its_worker_died_waits_for_the_report(self):
        """Not staged twice: the stager still works on the dead worker's attempt, so the job waits for its report
        (the first authcode still valid) until that attempt's timeout, and its report moves it on."""
        job_id = yield self.accepted_by_a_worker_that_died()
        self.stager.still = True
        yield self.pipeline.stage(job_id)
        self.assertEqual(self.stager.calls, [])
        self.assertEqual([job.stager_callback for job in self.stager.asked_still], [hash_authcode("first")])
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.stage_attempts, job.lease_owner, job.lease_until, job.deliveries),
                         (jobs.STAGING, 1, None, self.clock.seconds() + 100 - 11, 1))
        self.assertTrue(authcode_matches("first", job.stager_callback))
        self.assertEqual((yield self.reconciler.run_once()), 0)  # nobody re-drives it while it waits
        yield self.pipeline.staging_done(job, StageResult(success=True, staged_to="host", path="/staged/p"))
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.deliveries), (jobs.STAGED, 0))

    @defer.inlineCallbacks
    def test_a_job_the_stager_does_not_have_after_its_worker_died_is_staged_again(self):
        """The stager never took the dead worker's attempt, or has ended it: the job is staged again at once."""
        job_id = yield self.accepted_by_a_worker_that_died()
        self.stager.still = False
        yield self.pipeline.stage(job_id)
        self.assertEqual(len(self.stager.asked_still), 1)
        self.assertEqual([call[0] for call in self.stager.calls], [job_id])
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.stage_attempts), (jobs.STAGED, 2))

    @defer.inlineCallbacks
    def test_a_dead_workers_attempt_past_its_timeout_is_not_asked_about(self):
        """Once the dead worker's attempt has timed out its report would be refused: staged again, no question."""
        job_id = yield self.accepted_by_a_worker_that_died()
        self.clock.advance(100)
        self.stager.still = True
        yield self.pipeline.stage(job_id)
        self.assertEqual(self.stager.asked_still, [])
        self.assertEqual((yield self.status(job_id)), jobs.STAGED)

    @defer.inlineCallbacks
    def test_duplicate_message_does_not_stage_twice(self):
        """A second message for a job another worker holds is dropped without calling the stager."""
        job_id = yield self.submitted()
        yield self.store.take_lease(job_id, [jobs.SUBMITTED], "other-daemon", 10)
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
    def test_reconciler_redrives_every_unheld_state(self):
        """The reconciler re-publishes STAGING jobs to staging and TRANSFERRING ones to transfer, and gives
        SUBMITTED and STAGED ones back to the scheduler, which publishes them again."""
        published = []
        self.queue.publish = lambda queue, job_id: published.append((queue, job_id)) or defer.succeed(None)
        self.queue.publish_many = lambda queue, job_ids: defer.gatherResults([
            self.queue.publish(queue, job_id) for job_id in job_ids])
        ids = {}
        for state in (jobs.SUBMITTED, jobs.STAGING, jobs.STAGED, jobs.TRANSFERRING):
            ids[state] = yield self.submitted()
        yield self.store.transition(ids[jobs.STAGING], jobs.SUBMITTED, jobs.STAGING)
        for job_id in (ids[jobs.STAGED], ids[jobs.TRANSFERRING]):
            yield self.store.transition(job_id, jobs.SUBMITTED, jobs.STAGING)
            yield self.store.transition(job_id, jobs.STAGING, jobs.STAGED)
        yield self.store.transition(ids[jobs.TRANSFERRING], jobs.STAGED, jobs.TRANSFERRING)
        yield self.store.hold_in_queue(jobs.STAGED, [ids[jobs.STAGED]], 60)  # as a pass leaves it
        published.clear()
        self.clock.advance(61)  # the queue holds expire
        self.assertEqual((yield self.reconciler.run_once()), 4)
        self.assertEqual(sorted(published), sorted([
            (STAGING_QUEUE, ids[jobs.STAGING]), (TRANSFER_QUEUE, ids[jobs.TRANSFERRING]),
        ]))
        self.assertEqual((yield self.scheduled()), [1, 1])
        self.assertEqual(sorted(published), sorted([
            (STAGING_QUEUE, ids[jobs.SUBMITTED]), (STAGING_QUEUE, ids[jobs.STAGING]),
            (TRANSFER_QUEUE, ids[jobs.STAGED]), (TRANSFER_QUEUE, ids[jobs.TRANSFERRING]),
        ]))
        self.assertEqual((yield self.reconciler.run_once()), 0)

    @defer.inlineCallbacks
    def test_failed_publish_leaves_job_for_reconciler(self):
        """When the queue refuses a released job, the job stays committed; the next reconciler pass gives it back
        to the scheduler, whose next pass queues it."""
        self.queue.publish_many = lambda queue, job_ids: defer.fail(ConnectionError("broker down"))
        job_id = yield self.submitted()
        self.assertEqual((yield self.status(job_id)), jobs.SUBMITTED)
        del self.queue.publish_many
        self.assertEqual((yield self.scheduled()), [0, 0])  # its hold has not run out yet
        self.clock.advance(0.001)
        self.assertEqual((yield self.reconciler.run_once()), 1)
        self.assertEqual((yield self.scheduled()), [1, 0])

    @defer.inlineCallbacks
    def test_dead_worker_lease_expires_and_job_is_redriven(self):
        """A job leased by a worker that died is re-driven once the lease expires, not before."""
        job_id = yield self.submitted()
        yield self.store.take_lease(job_id, [jobs.SUBMITTED], "dead-worker", 10)
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
        """Cancelling a STAGING job tells the stager and frees the staged copy."""
        self.stager.answer = None
        job_id = yield self.submitted()
        yield self.pipeline.stage(job_id)
        yield self.pipeline.cancel(job_id)
        self.assertEqual((yield self.status(job_id)), jobs.CANCELLED)
        self.assertEqual((self.stager.cancelled, self.stager.released), ([job_id], [job_id]))

    @defer.inlineCallbacks
    def test_unconfirmed_publish_holds_only_one_lease(self):
        """A job whose message was never confirmed (the daemon died) is re-driven after one lease, not requeue_after."""
        never_confirmed = defer.Deferred()
        self.queue.publish = lambda queue, job_id: never_confirmed  # the broker never confirms
        job = jobs.Job(job_id=jobs.new_job_id(), product_id="p", destination_path="file:///d")
        yield self.store.create(job, hold=leases.in_queue(self.pipeline.lease))  # what submit() commits first
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
        self.mover.answer = ConnectionRefusedError("FTS down")
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
        self.mover.answer = ServiceAway("FTS down", retry_after=30.0)
        job_id = yield self.staged()
        yield self.pipeline.transfer(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.lease_owner, job.lease_until), (jobs.STAGED, None, self.clock.seconds() + 30))
        self.assertEqual((job.deliveries, job.time_away), (0, jobs.utc_from_seconds(self.clock.seconds())))
        self.clock.advance(31)
        self.mover.answer = None  # FTS is back and accepts the job
        yield self.pipeline.transfer(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.time_away, job.detailed_status), (jobs.TRANSFERRING, None, None))

    @defer.inlineCallbacks
    def test_transfer_service_away_too_long_is_error(self):
        """An asynchronous mover away for its give_up_after ends the job in ERROR naming the outage."""
        self.mover.asynchronous, self.mover.timeout = True, 500.0
        self.mover.answer = ServiceAway("FTS at https://fts:8446 is away: HTTP 503", retry_after=30.0)
        job_id = yield self.staged()
        while not (job := (yield self.store.get(job_id))).terminal:
            self.clock.advance(max(0, (job.lease_until or 0) - self.clock.seconds()) + 0.001)
            yield self.pipeline.transfer(job_id)
        self.assertEqual(job.detailed_status, "transfer failed: FTS at https://fts:8446 is away: HTTP 503"
                                              " (gave up after 2h 0m of trying)")
        self.assertEqual(self.stager.released, [job_id])

    @defer.inlineCallbacks
    def test_cancelled_while_submitting_is_stopped_once(self):
        """A job cancelled while an asynchronous mover submitted it has its transfer cancelled, once, by the pipeline."""
        self.mover.asynchronous, self.mover.timeout = True, 500.0
        job_id = yield self.staged()
        submitting = defer.Deferred()
        self.mover.transfer = lambda job: submitting
        transfer = defer.ensureDeferred(self.pipeline.transfer(job_id))
        yield self.pipeline.cancel(job_id)
        yield self.store.record_transfer_id(job_id, jobs.CANCELLED, "fts-job-1")
        submitting.callback(None)
        yield transfer
        self.assertEqual([(job.job_id, job.status, job.fts_jobid) for job in self.mover.cancelled],
                         [(job_id, jobs.CANCELLED, "fts-job-1")])
        self.assertEqual((yield self.status(job_id)), jobs.CANCELLED)

    @defer.inlineCallbacks
    def test_stager_away_waits_without_counting(self):
        """When the stager is away, the job waits retry_after seconds saying why, and the try counts as no attempt."""
        self.stager.answer = ServiceAway("the stager at http://stager/stage cannot be reached: refused", 40.0)
        job_id = yield self.submitted()
        yield self.pipeline.stage(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.lease_owner, job.lease_until), (jobs.STAGING, None, self.clock.seconds() + 40))
        self.assertEqual((job.stage_attempts, job.deliveries), (0, 0))
        self.assertEqual(job.time_away, jobs.utc_from_seconds(self.clock.seconds()))
        self.assertEqual(job.detailed_status, "waiting: the stager at http://stager/stage cannot be reached: refused;"
                                              " trying again in 40s, giving up 1h 0m from now")
        self.assertEqual((yield self.store.events(job_id))[-1]["reason"],
                         "the stager at http://stager/stage cannot be reached: refused; waiting (for up to 1h 0m)")
        self.assertEqual((yield self.reconciler.run_once()), 0)
        self.clock.advance(41)
        self.assertEqual((yield self.reconciler.run_once()), 1)

    @defer.inlineCallbacks
    def away_for(self, job_id, seconds):
        """Drive the job through tries of a stager that stays away for seconds; return the waits it was given."""
        waits, start = [], self.clock.seconds()
        while self.clock.seconds() - start < seconds:
            yield self.pipeline.stage(job_id)
            job = yield self.store.get(job_id)
            if job.terminal:
                break
            waits.append(round(job.lease_until - self.clock.seconds(), 1))
            self.clock.advance(job.lease_until - self.clock.seconds() + 0.001)  # a lease ends once its time has passed
        return waits

    @defer.inlineCallbacks
    def test_waits_grow_with_the_outage(self):
        """Each wait is half as long as the stager has been away, at least retry_after, at most five minutes."""
        self.stager.answer = ServiceAway("the stager is away", 10.0)
        job_id = yield self.submitted()
        waits = yield self.away_for(job_id, 1500)
        self.assertEqual(waits[:12], [10, 10, 10, 15, 22.5, 33.8, 50.6, 76, 113.9, 170.9, 256.3, 300])
        self.assertEqual(set(waits[12:]), {300})
        events = yield self.store.events(job_id)
        self.assertEqual([event["kind"] for event in events], ["state", "state", "attempt"])  # the outage noted once
        self.stager.answer = None  # the stager is back and takes the request
        yield self.pipeline.stage(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.stage_attempts, job.time_away, job.detailed_status),
                         (jobs.STAGING, 1, None, None))
        self.assertEqual((yield self.store.events(job_id))[-1]["reason"], "the stager is back after 27m 49s")

    @defer.inlineCallbacks
    def test_gives_up_after_give_up_after(self):
        """A stager away for give_up_after ends the job in ERROR naming the outage, on time, not before."""
        self.stager.answer = ServiceAway("the stager at http://stager/stage cannot take requests now: HTTP 503", 10.0)
        job_id = yield self.submitted()
        start = self.clock.seconds()
        yield self.away_for(job_id, 7200)
        job = yield self.store.get(job_id)
        self.assertEqual(job.status, jobs.ERROR)
        self.assertAlmostEqual(job.time_error.timestamp(), start + 3600, places=1)
        self.assertEqual(job.detailed_status, "staging failed: the stager at http://stager/stage cannot take requests"
                                              " now: HTTP 503 (gave up after 1h 0m of trying)")

    @defer.inlineCallbacks
    def test_max_attempts_counts_only_accepted_attempts(self):
        """Tries while the stager is away are no attempts: two timed-out accepted attempts end the job, not the tries."""
        job_id = yield self.submitted()
        self.stager.answer = ServiceAway("away", 1.0)
        yield self.away_for(job_id, 30)
        for _ in range(2):  # accepted, then never called back
            self.stager.answer = None
            yield self.pipeline.stage(job_id)
            self.clock.advance(101)
            self.stager.answer = ServiceAway("away", 1.0)
            yield self.away_for(job_id, 30)
        yield self.pipeline.stage(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.detailed_status),
                         (jobs.ERROR, "staging timed out after 2 attempt(s) of 100s each"))

    @defer.inlineCallbacks
    def test_daemon_crashing_on_a_job_ends_it(self):
        """A job whose lease was taken max_deliveries times by workers that never gave it back ends in ERROR."""
        job_id = yield self.submitted()
        yield self.pipeline.stage(job_id)  # STAGED; this worker gave its lease back
        self.assertEqual((yield self.store.get(job_id)).deliveries, 0)
        for crash in range(self.pipeline.max_deliveries):
            self.assertIsNotNone((yield self.store.take_lease(job_id, [jobs.STAGED], f"crashed-{crash}", 10)))
            self.clock.advance(11)  # it died: its lease runs out
        self.assertEqual((yield self.store.get(job_id)).deliveries, self.pipeline.max_deliveries)
        yield self.pipeline.transfer(job_id)
        job = yield self.store.get(job_id)
        self.assertEqual(job.status, jobs.ERROR)
        self.assertEqual(job.detailed_status, "failed 2 times in the transfer step: the daemon stopped (crashed or"
                                              " was killed) while working on it each time")
        self.assertEqual(self.mover.calls, [])
        self.assertEqual(self.stager.released, [job_id])

    @defer.inlineCallbacks
    def test_job_a_worker_died_on_runs_alone(self):
        """A job a worker died on waits, without its lease, until the steps running end; later ones wait for it."""
        ordinary = yield self.staged()
        suspect = yield self.staged()
        later = yield self.staged()
        yield self.store.take_lease(suspect, [jobs.STAGED], "crashed", 10)
        self.clock.advance(11)  # that worker died
        moving = {}
        self.mover.transfer = lambda job: moving.setdefault(job.job_id, defer.Deferred())
        steps = []
        for job_id in (ordinary, suspect, later):  # in this order
            steps.append(defer.ensureDeferred(self.pipeline.transfer(job_id)))
            yield wait_for(lambda: len(self.pipeline._isolation._waiting) + len(moving) == len(steps))
        self.assertEqual(list(moving), [ordinary])
        job = yield self.store.get(suspect)
        self.assertEqual((job.lease_owner, job.deliveries), (None, 1))  # waiting, its crash counted once
        for step, job_id in enumerate((ordinary, suspect, later)):
            moving[job_id].callback(TransferResult(success=True))
            yield steps[step]
            yield wait_for(lambda: len(moving) == min(step + 2, 3))
            self.assertEqual(list(moving), [ordinary, suspect, later][:step + 2])
        for job_id in moving:
            self.assertEqual((yield self.status(job_id)), jobs.SUCCESS)

    @defer.inlineCallbacks
    def test_store_away_mid_step_counts_no_delivery(self):
        """A lease the store was too far away to give back is given back once it is back: no delivery counted."""
        self.mover.answer = RuntimeError("disk full")
        job_id = yield self.staged()
        transition = self.store.transition
        self.store.transition = lambda *args, **kwargs: defer.fail(StoreUnavailable("the database is unreachable"))
        end_lease = self.store.end_lease
        self.store.end_lease = lambda *args, **kwargs: defer.fail(StoreUnavailable("the database is unreachable"))
        yield self.assertFailure(defer.ensureDeferred(self.pipeline.transfer(job_id)), StoreUnavailable)
        self.assertEqual((yield self.store.get(job_id)).deliveries, 1)
        self.store.transition, self.store.end_lease = transition, end_lease
        yield self.pipeline._renew_leases()
        job = yield self.store.get(job_id)
        self.assertEqual((job.status, job.lease_owner, job.deliveries), (jobs.STAGED, None, 0))


class WorkerTests(PipelineTestCase):
    consume = True

    @defer.inlineCallbacks
    def test_in_line_stager_and_mover_reach_success(self):
        """With workers consuming, a job runs SUBMITTED to SUCCESS, and the staged copy is freed."""
        job_id = yield self.submitted()
        yield settled(self.daemon)
        job = yield self.store.get(job_id)
        self.assertEqual(job.status, jobs.SUCCESS)
        self.assertEqual((job.stager_path, job.stage_attempts, job.lease_owner), ("/staged/p", 1, None))
        self.assertNotIn("stager_path", job.public_view())  # the copy is freed: not shown any more
        self.assertEqual(self.stager.released, [job_id])


    @defer.inlineCallbacks
    def test_repeated_exceptions_dead_letter_to_error(self):
        """A step that keeps raising is dead-lettered and its job ends in ERROR saying why."""
        self.stager.answer = RuntimeError("stager exploded")
        job_id = yield self.submitted()
        yield self.queue.idle()
        self.assertEqual(len(self.stager.calls), 1)  # delivered once; the next delivery is due later
        self.clock.advance(self.queue.retry_delay)
        yield self.queue.idle()
        job = yield self.store.get(job_id)
        self.assertEqual(job.status, jobs.ERROR)
        self.assertIn("stager exploded", job.detailed_status)
        self.assertEqual(len(self.stager.calls), 2)
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_stopping_abandons_staging_in_flight(self):
        """Stopping the daemon does not wait for a stager that is still busy: the job is left free, not in ERROR."""
        self.stager.answer = defer.Deferred()  # a recall that never ends
        job_id = yield self.submitted()
        yield self.stager.asked
        yield self.daemon.stopService()
        with sqlite3.connect(self.database) as connection:
            row = connection.execute("SELECT status, lease_owner, lease_until FROM jobs WHERE job_id = ?",
                                     (job_id,)).fetchone()
        self.assertEqual(row, (jobs.STAGING, None, None))

    @defer.inlineCallbacks
    def test_stopping_starts_no_new_staging(self):
        """With more jobs queued than workers, stopping abandons the stagings in flight and starts none of the rest."""
        self.stager.answer = defer.Deferred  # recalls that never end
        for _ in range(self.pipeline.stage_prefetch + 3):
            yield self.submitted()
        yield self.stager.asked
        while len(self.stager.calls) < self.pipeline.stage_prefetch:
            yield task.deferLater(reactor, 0.01, lambda: None)  # the workers take their leases (real SQLite threads)
        yield self.daemon.stopService()
        self.assertEqual(len(self.stager.calls), self.pipeline.stage_prefetch)
