"""The JobStore contract: every IJobStore implementation must pass these.

A concrete test case mixes JobStoreContract into trial's TestCase and
provides make_store(clock), returning a migrated store with an empty jobs table.
"""

from datetime import timezone

from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from transferd import jobs, leases
from transferd.interfaces import IJobStore
from transferd.store.sql import SubmissionExists


def a_job(**overrides):
    values = dict(
        job_id=jobs.new_job_id(),
        product_id="sample-001",
        destination_path="file:///tmp/deliveries",
    )
    values.update(overrides)
    return jobs.Job(**values)


def hold_30s(age):
    """A poll hold of 30 s whatever the job's age (take_for_polling)."""
    return 30


class JobStoreContract:
    def make_store(self, clock):
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.store = yield self.make_store(self.clock)
        self.addCleanup(self.store.stopService)

    @defer.inlineCallbacks
    def _submitted(self, **overrides):
        job = a_job(**overrides)
        yield self.store.create(job)
        return job

    def test_provides_interface(self):
        """The store provides IJobStore."""
        self.assertTrue(verifyObject(IJobStore, self.store))

    @defer.inlineCallbacks
    def test_create_then_get(self):
        """A created job reads back SUBMITTED with its fields and time_submitted from the clock."""
        job = yield self._submitted(submitter="CN=Ann", product_id="prod-\u00e9\u6f22")
        got = yield self.store.get(job.job_id)
        self.assertEqual(got.status, jobs.SUBMITTED)
        self.assertEqual(got.product_id, "prod-\u00e9\u6f22")
        self.assertEqual(got.submitter, "CN=Ann")
        self.assertEqual(got.destination_path, job.destination_path)
        self.assertEqual(got.time_submitted.timestamp(), self.clock.seconds())
        self.assertEqual(got.time_submitted.tzinfo, timezone.utc)
        self.assertEqual(got.stage_attempts, 0)

    @defer.inlineCallbacks
    def test_get_unknown(self):
        """An unknown job id reads as None."""
        self.assertIsNone((yield self.store.get(jobs.new_job_id())))

    @defer.inlineCallbacks
    def test_duplicate_create_fails(self):
        """Creating a job id twice fails and keeps the first row."""
        job = yield self._submitted()
        yield self.assertFailure(self.store.create(a_job(job_id=job.job_id, product_id="x")), Exception)
        self.assertEqual((yield self.store.get(job.job_id)).product_id, job.product_id)

    @defer.inlineCallbacks
    def test_transition_sets_state_time_and_fields(self):
        """A legal transition from the current state changes it, stamps time_<state> and sets fields."""
        job = yield self._submitted()
        self.clock.advance(5)
        changed = yield self.store.transition(
            job.job_id, jobs.SUBMITTED, jobs.STAGING,
            {"stager_callback": "ab" * 32, "stage_attempts": 1, "stager_request": "tape-req-1"},
        )
        self.assertTrue(changed)
        got = yield self.store.get(job.job_id)
        self.assertEqual(got.status, jobs.STAGING)
        self.assertEqual(got.time_staging.timestamp(), self.clock.seconds())
        self.assertEqual(got.stager_callback, "ab" * 32)
        self.assertEqual(got.stage_attempts, 1)
        self.assertEqual(got.stager_request, "tape-req-1")

    @defer.inlineCallbacks
    def test_transition_is_compare_and_set(self):
        """A transition from a state the job is not in changes nothing and reports False."""
        job = yield self._submitted()
        changed = yield self.store.transition(job.job_id, jobs.STAGED, jobs.TRANSFERRING)
        self.assertFalse(changed)
        self.assertEqual((yield self.store.get(job.job_id)).status, jobs.SUBMITTED)
        self.assertFalse((yield self.store.transition(jobs.new_job_id(), jobs.SUBMITTED, jobs.STAGING)))

    @defer.inlineCallbacks
    def test_concurrent_transitions_one_winner(self):
        """Of many concurrent identical transitions exactly one succeeds."""
        job = yield self._submitted()
        results = yield defer.gatherResults(
            [self.store.transition(job.job_id, jobs.SUBMITTED, jobs.CANCELLED) for _ in range(10)]
        )
        self.assertEqual(sorted(results), [False] * 9 + [True])

    def test_illegal_transitions_refused(self):
        """The state machine refuses skipped steps, moves out of terminal states and ERROR without a reason."""
        for old, new in [
            (jobs.SUBMITTED, jobs.TRANSFERRING),
            (jobs.SUCCESS, jobs.ERROR),
            (jobs.CANCELLED, jobs.SUBMITTED),
            (jobs.STAGED, jobs.STAGING),
        ]:
            self.assertRaises(jobs.InvalidTransition, self.store.transition, "x", old, new, {"detailed_status": "r"})
        self.assertRaises(jobs.InvalidTransition, self.store.transition, "x", jobs.STAGING, jobs.ERROR)

    @defer.inlineCallbacks
    def test_error_records_time_and_reason(self):
        """ERROR always carries time_error and detailed_status."""
        job = yield self._submitted()
        yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.ERROR, {"detailed_status": "no such product"})
        got = yield self.store.get(job.job_id)
        self.assertEqual((got.status, got.detailed_status), (jobs.ERROR, "no such product"))
        self.assertIsNotNone(got.time_error)

    @defer.inlineCallbacks
    def test_update_guarded_by_status(self):
        """update() changes fields only while the job is in the stated status."""
        job = yield self._submitted()
        self.assertFalse((yield self.store.update(job.job_id, jobs.STAGING, {"fts_jobid": "f"})))
        self.assertTrue((yield self.store.update(job.job_id, jobs.SUBMITTED, {"fts_jobid": "f"})))
        self.assertTrue((yield self.store.update(job.job_id, jobs.SUBMITTED, {"fts_jobid": "f"})))
        self.assertEqual((yield self.store.get(job.job_id)).fts_jobid, "f")
        self.assertRaises(ValueError, self.store.update, job.job_id, jobs.SUBMITTED, {"bogus": 1})

    @defer.inlineCallbacks
    def test_record_backend_ids(self):
        """A stager's request id is stored only while the job is STAGING; a transfer id only in the stated status."""
        job = yield self._submitted()
        self.assertFalse((yield self.store.record_stager_request(job.job_id, "req-1")))
        yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING)
        self.assertTrue((yield self.store.record_stager_request(job.job_id, "req-1")))
        self.assertFalse((yield self.store.record_transfer_id(job.job_id, jobs.STAGED, "fts-1")))
        yield self.store.transition(job.job_id, jobs.STAGING, jobs.STAGED)
        self.assertTrue((yield self.store.record_transfer_id(job.job_id, jobs.STAGED, "fts-1")))
        got = yield self.store.get(job.job_id)
        self.assertEqual((got.stager_request, got.fts_jobid), ("req-1", "fts-1"))

    @defer.inlineCallbacks
    def test_take_lease_is_exclusive_until_expiry(self):
        """One owner holds a lease; another can take it only after it expires; the job comes back leased."""
        job = yield self._submitted()
        taken = yield self.store.take_lease(job.job_id, [jobs.SUBMITTED], "a", 30)
        self.assertEqual((taken.job_id, taken.status, taken.lease_owner), (job.job_id, jobs.SUBMITTED, "a"))
        self.assertIsNone((yield self.store.take_lease(job.job_id, [jobs.SUBMITTED], "b", 30)))
        self.assertIsNone((yield self.store.take_lease(job.job_id, [jobs.STAGING], "b", 30)))
        self.clock.advance(31)
        taken = yield self.store.take_lease(job.job_id, [jobs.STAGING, jobs.SUBMITTED], "b", 30)
        self.assertEqual(taken.lease_owner, "b")
        self.assertEqual((yield self.store.get(job.job_id)).lease_owner, "b")
        self.assertIsNone((yield self.store.take_lease(jobs.new_job_id(), [jobs.SUBMITTED], "b", 30)))

    @defer.inlineCallbacks
    def test_concurrent_leases_one_winner(self):
        """Of many owners taking a lease at once exactly one wins."""
        job = yield self._submitted()
        results = yield defer.gatherResults(
            [self.store.take_lease(job.job_id, [jobs.SUBMITTED], f"owner-{i}", 30) for i in range(10)]
        )
        self.assertEqual(len([r for r in results if r is not None]), 1)

    @defer.inlineCallbacks
    def test_renew_and_end_leases(self):
        """renew_leases() extends only the owner's leases; end_lease() frees them, or leaves a wait."""
        one = yield self._submitted()
        two = yield self._submitted()
        yield self.store.take_lease(one.job_id, [jobs.SUBMITTED], "a", 30)
        yield self.store.take_lease(two.job_id, [jobs.SUBMITTED], "b", 30)
        self.clock.advance(20)
        self.assertEqual((yield self.store.renew_leases("a", [one.job_id, two.job_id], 30)), 1)
        self.assertEqual((yield self.store.renew_leases("a", [], 30)), 0)
        self.clock.advance(20)
        free = yield self.store.jobs_to_redrive([jobs.SUBMITTED], 10)
        self.assertEqual([j.job_id for j in free], [two.job_id])
        self.assertFalse((yield self.store.end_lease(one.job_id, "b")))
        self.assertTrue((yield self.store.end_lease(one.job_id, "a", then=leases.waiting(5))))
        got = yield self.store.get(one.job_id)
        self.assertIsNone(got.lease_owner)
        self.assertEqual(got.lease_until, self.clock.seconds() + 5)
        yield self.store.take_lease(two.job_id, [jobs.SUBMITTED], "c", 30)
        self.assertTrue((yield self.store.end_lease(two.job_id, "c")))
        got = yield self.store.get(two.job_id)
        self.assertEqual((got.lease_owner, got.lease_until), (None, None))

    @defer.inlineCallbacks
    def test_transition_clears_lease_and_can_wait(self):
        """A transition drops the owner, and leaves a wait of that many seconds when given one."""
        job = yield self._submitted()
        yield self.store.take_lease(job.job_id, [jobs.SUBMITTED], "a", 30)
        yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING, hold=leases.waiting(100))
        got = yield self.store.get(job.job_id)
        self.assertIsNone(got.lease_owner)
        self.assertEqual(got.lease_until, self.clock.seconds() + 100)
        yield self.store.transition(job.job_id, jobs.STAGING, jobs.STAGED)
        self.assertIsNone((yield self.store.get(job.job_id)).lease_until)

    @defer.inlineCallbacks
    def test_jobs_to_redrive_filters_state_lease_and_limit(self):
        """jobs_to_redrive() returns only free jobs in the given states, oldest first, up to limit."""
        first = yield self._submitted()
        self.clock.advance(1)
        held = a_job()
        yield self.store.create(held, hold=leases.in_queue(60))
        self.clock.advance(1)
        third = yield self._submitted()
        done = yield self._submitted()
        yield self.store.transition(done.job_id, jobs.SUBMITTED, jobs.CANCELLED)
        found = yield self.store.jobs_to_redrive(list(jobs.ACTIVE), 10)
        self.assertEqual([j.job_id for j in found], [first.job_id, third.job_id])
        found = yield self.store.jobs_to_redrive(list(jobs.ACTIVE), 1)
        self.assertEqual([j.job_id for j in found], [first.job_id])
        self.clock.advance(61)
        found = yield self.store.jobs_to_redrive([jobs.SUBMITTED], 10)
        self.assertEqual({j.job_id for j in found}, {first.job_id, held.job_id, third.job_id})

    @defer.inlineCallbacks
    def test_public_view_hides_callback_and_lease(self):
        """The status view shows non-null fields but never the callback hash or lease bookkeeping."""
        job = yield self._submitted()
        yield self.store.take_lease(job.job_id, [jobs.SUBMITTED], "a", 30)
        yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING, {"stager_callback": "c" * 64})
        view = (yield self.store.get(job.job_id)).public_view()
        self.assertEqual(view["status"], jobs.STAGING)
        self.assertTrue(view["time_staging"].endswith("Z"))
        for hidden in ("stager_callback", "lease_owner", "lease_until", "fts_jobid"):
            self.assertNotIn(hidden, view)

    @defer.inlineCallbacks
    def test_migrate_is_idempotent(self):
        """Migrating an up-to-date schema changes nothing and keeps the rows."""
        job = yield self._submitted()
        version = yield self.store.migrate()
        self.assertEqual(version, len(self.store.migrations))
        self.assertEqual((yield self.store.schema_version()), version)
        self.assertIsNotNone((yield self.store.get(job.job_id)))

    @defer.inlineCallbacks
    def test_queue_hold_takeable_but_not_redriven(self):
        """A job in the queue can be leased at once by a consumer, but is not re-driven until the hold expires."""
        job = a_job()
        yield self.store.create(job, hold=leases.in_queue(60))
        self.assertEqual((yield self.store.jobs_to_redrive([jobs.SUBMITTED], 10)), [])
        found = yield self.store.jobs_to_redrive([jobs.SUBMITTED], 10, include_queue_holds=True)
        self.assertEqual([j.job_id for j in found], [job.job_id])
        self.assertIsNotNone((yield self.store.take_lease(job.job_id, [jobs.SUBMITTED], "worker", 30)))
        self.assertIsNone((yield self.store.take_lease(job.job_id, [jobs.SUBMITTED], "other", 30)))

    @defer.inlineCallbacks
    def test_wait_blocks_leases(self):
        """A job waiting (on a stager) cannot be leased before the wait ends."""
        job = yield self._submitted()
        yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING, hold=leases.waiting(100))
        self.assertIsNone((yield self.store.take_lease(job.job_id, [jobs.STAGING], "worker", 30)))
        self.clock.advance(101)
        self.assertIsNotNone((yield self.store.take_lease(job.job_id, [jobs.STAGING], "worker", 30)))

    @defer.inlineCallbacks
    def test_transition_can_keep_an_owner(self):
        """A transition with a worker's hold leaves the job leased to that worker."""
        job = yield self._submitted()
        yield self.store.take_lease(job.job_id, [jobs.SUBMITTED], "w", 30)
        yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING, hold=leases.worker("w", 30))
        got = yield self.store.get(job.job_id)
        self.assertEqual((got.lease_owner, got.lease_until), ("w", self.clock.seconds() + 30))
        self.assertIsNone((yield self.store.take_lease(job.job_id, [jobs.STAGING], "x", 30)))

    @defer.inlineCallbacks
    def test_take_for_polling_shares_jobs_between_pollers(self):
        """Pollers taking batches at once never get the same job; a job comes back once its poll lease expires."""
        ids = []
        for _ in range(6):
            job = yield self._submitted()
            yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING,
                                        {"stager_request": "r" if len(ids) < 5 else None})
            ids.append(job.job_id)
        batches = yield defer.gatherResults(
            [self.store.take_for_polling(jobs.STAGING, f"poller-{i}", hold_30s, 2, having="stager_request") for i in range(4)]
        )
        taken = [job.job_id for batch in batches for job in batch]
        self.assertEqual(sorted(taken), sorted(ids[:5]))
        self.assertTrue(all(len(batch) <= 2 for batch in batches))
        self.assertEqual((yield self.store.take_for_polling(jobs.STAGING, "late", hold_30s, 10, having="stager_request")), [])
        self.clock.advance(31)
        again = yield self.store.take_for_polling(jobs.STAGING, "next", hold_30s, 10)
        self.assertEqual(sorted(j.job_id for j in again), sorted(ids))
        self.assertTrue(all(j.poll_owner == "next" for j in again))
        self.assertNotIn("poll_owner", again[0].public_view())

    @defer.inlineCallbacks
    def test_take_for_polling_holds_each_job_by_its_age_in_the_state(self):
        """hold is asked about each job's seconds since it entered the state, and the job is taken that long."""
        old = yield self._submitted()
        yield self.store.transition(old.job_id, jobs.SUBMITTED, jobs.STAGING, {"stager_request": "r"})
        self.clock.advance(1000)
        young = yield self._submitted()
        yield self.store.transition(young.job_id, jobs.SUBMITTED, jobs.STAGING, {"stager_request": "r"})
        self.clock.advance(10)
        ages = []

        def hold(age):
            ages.append(age)
            return 30 if age < 100 else 240

        now = self.clock.seconds()
        taken = yield self.store.take_for_polling(jobs.STAGING, "poller", hold, 10, having="stager_request")
        self.assertEqual(sorted(round(age) for age in ages), [10, 1010])
        self.assertEqual({job.job_id: job.poll_until for job in taken}, {young.job_id: now + 30, old.job_id: now + 240})
        self.clock.advance(31)
        again = yield self.store.take_for_polling(jobs.STAGING, "poller", hold, 10, having="stager_request")
        self.assertEqual([job.job_id for job in again], [young.job_id])

    @defer.inlineCallbacks
    def test_hold_in_queue_marks_only_free_jobs_in_state(self):
        """hold_in_queue() puts the listed jobs still in the state under a queue hold, never one a worker holds."""
        free, worked, moved = (yield self._submitted()), (yield self._submitted()), (yield self._submitted())
        yield self.store.take_lease(worked.job_id, [jobs.SUBMITTED], "worker", 30)
        yield self.store.transition(moved.job_id, jobs.SUBMITTED, jobs.STAGING)
        count = yield self.store.hold_in_queue(jobs.SUBMITTED, [free.job_id, worked.job_id, moved.job_id], 60)
        self.assertEqual(count, 1)
        got = yield self.store.get(free.job_id)
        self.assertEqual((got.lease_owner, got.lease_until), (leases.IN_QUEUE, self.clock.seconds() + 60))
        self.assertEqual((yield self.store.get(worked.job_id)).lease_owner, "worker")
        self.assertEqual((yield self.store.hold_in_queue(jobs.SUBMITTED, [], 60)), 0)

    @defer.inlineCallbacks
    def test_history_written_with_each_change(self):
        """Creation, every transition and every noted attempt are in the job's history, in order, with actor and reason."""
        job = a_job()
        yield self.store.create(job, actor="user CN=Ann")
        self.clock.advance(2)
        yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING, actor="worker-1")
        self.assertFalse((yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING, actor="late")))
        self.assertTrue((yield self.store.update(job.job_id, jobs.STAGING, {"stage_attempts": 2},
                                                 note=("worker-2", "staging attempt 2"))))
        self.assertTrue((yield self.store.note(job.job_id, jobs.STAGING, "stager", "tape library busy")))
        self.assertFalse((yield self.store.note(job.job_id, jobs.STAGED, "stager", "not in that state")))
        yield self.store.transition(job.job_id, jobs.STAGING, jobs.ERROR, {"detailed_status": "tape unreadable"},
                                    actor="stager")
        history = yield self.store.events(job.job_id)
        self.assertEqual(
            [(e["kind"], e["old_status"], e["new_status"], e["actor"], e["reason"]) for e in history],
            [("state", None, jobs.SUBMITTED, "user CN=Ann", None),
             ("state", jobs.SUBMITTED, jobs.STAGING, "worker-1", None),
             ("attempt", jobs.STAGING, jobs.STAGING, "worker-2", "staging attempt 2"),
             ("attempt", jobs.STAGING, jobs.STAGING, "stager", "tape library busy"),
             ("state", jobs.STAGING, jobs.ERROR, "stager", "tape unreadable")],
        )
        self.assertEqual(history[1]["time"].timestamp(), self.clock.seconds())
        got = yield self.store.get(job.job_id)
        self.assertEqual(got.time_updated.timestamp(), self.clock.seconds())
        self.assertEqual((yield self.store.events(jobs.new_job_id())), [])

    @defer.inlineCallbacks
    def test_v1_fields_stored(self):
        """Priority, label, metadata and the destination host are stored; the prototype's view leaves them out."""
        job = a_job(priority=5, label="run-7", metadata='{"obs": 42}', destination_path="davs://se.example.org:2880/d")
        yield self.store.create(job)
        got = yield self.store.get(job.job_id)
        self.assertEqual((got.priority, got.label, got.metadata, got.destination_host),
                         (5, "run-7", '{"obs": 42}', "se.example.org"))
        self.assertNotIn("label", got.public_view())
        self.assertEqual(got.public_view(v1=True)["metadata"], {"obs": 42})

    @defer.inlineCallbacks
    def test_create_many_commits_jobs_and_history_together(self):
        """create_many() stores every job SUBMITTED under the hold, each with its first history row."""
        batch = [a_job(submitter="CN=Ann", label=f"l{i}") for i in range(3)]
        yield self.store.create_many(batch, hold=leases.in_queue(30), actor="CN=Ann")
        for job in batch:
            got = yield self.store.get(job.job_id)
            self.assertEqual((got.status, got.label, got.lease_owner, got.lease_until),
                             (jobs.SUBMITTED, job.label, leases.IN_QUEUE, self.clock.seconds() + 30))
            history = yield self.store.events(job.job_id)
            self.assertEqual([(e["new_status"], e["actor"]) for e in history], [(jobs.SUBMITTED, "CN=Ann")])

    @defer.inlineCallbacks
    def test_create_many_is_all_or_nothing(self):
        """When one job of a batch cannot be stored, none of the batch is."""
        existing = yield self._submitted()
        batch = [a_job(), a_job(job_id=existing.job_id), a_job()]
        yield self.assertFailure(self.store.create_many(batch), Exception)
        self.assertIsNone((yield self.store.get(batch[0].job_id)))
        self.assertIsNone((yield self.store.get(batch[2].job_id)))
        self.assertEqual(len((yield self.store.events(existing.job_id))), 1)

    @defer.inlineCallbacks
    def test_submission_stored_once(self):
        """A submission's answer is stored with its jobs; the same submitter and id again fails and creates nothing."""
        first = [a_job(submitter="CN=Ann")]
        answer = {"submission_id": "s-1", "accepted": 1, "results": [{"index": 0, "job_id": first[0].job_id}]}
        self.assertIsNone((yield self.store.submission("CN=Ann", "s-1")))
        yield self.store.create_many(first, submission=jobs.Submission("CN=Ann", "s-1", answer))
        self.assertEqual((yield self.store.submission("CN=Ann", "s-1")), answer)
        again = [a_job(submitter="CN=Ann")]
        yield self.assertFailure(
            self.store.create_many(again, submission=jobs.Submission("CN=Ann", "s-1", {"other": True})),
            SubmissionExists)
        self.assertIsNone((yield self.store.get(again[0].job_id)))
        self.assertEqual((yield self.store.submission("CN=Ann", "s-1")), answer)
        self.assertIsNone((yield self.store.submission("CN=Bob", "s-1")))
        yield self.store.create_many([], submission=jobs.Submission(None, "s-1", {"refused": 1}))
        self.assertEqual((yield self.store.submission(None, "s-1")), {"refused": 1})

    @defer.inlineCallbacks
    def _listed(self, job_filter=jobs.JobFilter(), limit=100, after=None):
        return [job.job_id for job in (yield self.store.list_jobs(job_filter, limit, after))]

    @defer.inlineCallbacks
    def test_list_jobs_newest_first_with_filters(self):
        """list_jobs() orders by time_submitted then job_id, newest first, and each filter narrows it."""
        old = yield self._submitted(submitter="CN=Ann", label="run-1", destination_path="davs://a.example.org/d")
        self.clock.advance(10)
        middle = yield self._submitted(submitter="CN=Bob", product_id="other", label="run-1")
        self.clock.advance(10)
        new = yield self._submitted(submitter="CN=Ann")
        yield self.store.transition(new.job_id, jobs.SUBMITTED, jobs.STAGING)
        t0 = jobs.utc_from_seconds(self.clock.seconds())
        self.assertEqual((yield self._listed()), [new.job_id, middle.job_id, old.job_id])
        self.assertEqual((yield self._listed(limit=2)), [new.job_id, middle.job_id])
        cases = [
            (jobs.JobFilter(statuses=(jobs.STAGING,)), [new]),
            (jobs.JobFilter(statuses=(jobs.STAGING, jobs.SUBMITTED)), [new, middle, old]),
            (jobs.JobFilter(submitter="CN=Ann"), [new, old]),
            (jobs.JobFilter(label="run-1"), [middle, old]),
            (jobs.JobFilter(product_id="other"), [middle]),
            (jobs.JobFilter(destination_host="a.example.org"), [old]),
            (jobs.JobFilter(submitted_after=jobs.utc_from_seconds(self.clock.seconds() - 15)), [new, middle]),
            (jobs.JobFilter(submitted_before=jobs.utc_from_seconds(self.clock.seconds() - 15)), [old]),
            (jobs.JobFilter(updated_after=jobs.utc_from_seconds(self.clock.seconds() - 1)), [new]),
            (jobs.JobFilter(job_ids=(old.job_id, new.job_id), submitter="CN=Ann"), [new, old]),
            (jobs.JobFilter(label="run-1", submitter="CN=Ann", statuses=(jobs.SUBMITTED,)), [old]),
            (jobs.JobFilter(submitted_after=t0), []),
        ]
        for job_filter, expected in cases:
            self.assertEqual((yield self._listed(job_filter)), [job.job_id for job in expected], job_filter)

    @defer.inlineCallbacks
    def test_list_jobs_pages_neither_skip_nor_repeat(self):
        """Paging with after= the last job seen returns every job once, ties in time included, while jobs arrive."""
        existing = []
        for i in range(7):
            existing.append((yield self._submitted()))
            if i % 3 == 2:
                self.clock.advance(1)  # several jobs share each time_submitted
        seen, after = [], None
        while True:
            page = yield self.store.list_jobs(jobs.JobFilter(), 2, after)
            seen += [job.job_id for job in page]
            yield self._submitted()  # a new job arrives between pages
            if len(page) < 2:
                break
            after = (page[-1].time_submitted, page[-1].job_id)
        self.assertEqual(sorted(seen), sorted(job.job_id for job in existing))
        self.assertEqual(len(seen), len(set(seen)))

    @defer.inlineCallbacks
    def test_count_before(self):
        """count_before() counts the jobs in a state that entered it before a moment (the jobs ahead in a queue)."""
        first = yield self._submitted()
        self.clock.advance(1)
        second = yield self._submitted()
        self.clock.advance(1)
        yield self._submitted()
        yield self.store.transition(first.job_id, jobs.SUBMITTED, jobs.STAGING)
        now = jobs.utc_from_seconds(self.clock.seconds())
        self.assertEqual((yield self.store.count_before(jobs.SUBMITTED, "time_submitted", now)), 1)
        got = yield self.store.get(second.job_id)
        self.assertEqual((yield self.store.count_before(jobs.SUBMITTED, "time_submitted", got.time_submitted)), 0)
        self.assertEqual((yield self.store.count_before(jobs.STAGING, "time_updated", now)), 0)
        self.assertEqual((yield self.store.count_before(
            jobs.STAGING, "time_updated", jobs.utc_from_seconds(self.clock.seconds() + 1))), 1)
        self.assertRaises(ValueError, self.store.count_before, jobs.SUBMITTED, "status; DROP TABLE jobs", now)

    @defer.inlineCallbacks
    def test_count_by_status(self):
        """count_by_status() counts the jobs in each state that has any (for /metrics)."""
        self.assertEqual((yield self.store.count_by_status()), {})
        started = []
        for _ in range(3):
            started.append((yield self._submitted()))
        yield self.store.transition(started[0].job_id, jobs.SUBMITTED, jobs.STAGING)
        yield self.store.transition(started[1].job_id, jobs.SUBMITTED, jobs.CANCELLED)
        self.assertEqual((yield self.store.count_by_status()),
                         {jobs.SUBMITTED: 1, jobs.STAGING: 1, jobs.CANCELLED: 1})

    @defer.inlineCallbacks
    def test_transition_many_moves_those_still_in_the_state_each_with_its_fields(self):
        """150 TRANSFERRING jobs (more than one statement's chunk) and one already CANCELLED: one transition_many
        moves the 150 to SUCCESS, each with its own fts_details and the shared detailed_status, free, with a
        history line and an event each and one wake-up of the listeners; the cancelled job is left alone; each
        transition is measured; the kept counts follow."""
        from transferd.metrics import Metrics

        self.store.metrics = metrics = Metrics()
        woken = []
        self.store.listen_for_events(woken.append)
        ids = []
        for _ in range(151):
            job = yield self._submitted()
            for old, new in ((jobs.SUBMITTED, jobs.STAGING), (jobs.STAGING, jobs.STAGED),
                             (jobs.STAGED, jobs.TRANSFERRING)):
                yield self.store.transition(job.job_id, old, new, hold=leases.worker("w", 60))
            ids.append(job.job_id)
        cancelled = ids.pop()
        yield self.store.transition(cancelled, jobs.TRANSFERRING, jobs.CANCELLED, {"detailed_status": "by Ann"})
        del woken[:]
        self.clock.advance(40)
        changes = {job_id: {"detailed_status": "delivered", "fts_details": f'{{"fts_jobid": "{job_id}"}}'}
                   for job_id in [*ids, cancelled]}
        moved = yield self.store.transition_many(jobs.TRANSFERRING, jobs.SUCCESS, changes, actor="FTS")
        self.assertEqual(moved, set(ids))
        self.assertEqual(woken, [True])
        for job_id in (ids[0], ids[99], ids[100], ids[-1]):
            got = yield self.store.get(job_id)
            self.assertEqual((got.status, got.detailed_status, got.fts_details),
                             (jobs.SUCCESS, "delivered", f'{{"fts_jobid": "{job_id}"}}'))
            self.assertEqual(got.time_success.timestamp(), self.clock.seconds())
            self.assertEqual((got.lease_owner, got.lease_until, got.deliveries), (None, None, 0))
            last = (yield self.store.events(job_id))[-1]
            self.assertEqual((last["old_status"], last["new_status"], last["actor"], last["reason"]),
                             (jobs.TRANSFERRING, jobs.SUCCESS, "FTS", "delivered"))
        left = yield self.store.get(cancelled)
        self.assertEqual((left.status, left.fts_details), (jobs.CANCELLED, None))
        self.assertEqual(metrics.transitions.labels(jobs.TRANSFERRING, jobs.SUCCESS)._value.get(), 150)
        self.assertAlmostEqual(metrics.time_in_state.labels(jobs.TRANSFERRING)._sum.get(), 40 * 150,
                               places=1)
        self.assertEqual((yield self.store.count_by_status()), {jobs.SUCCESS: 150, jobs.CANCELLED: 1})
        # Once: a second report of the same outcomes moves nothing.
        self.assertEqual((yield self.store.transition_many(jobs.TRANSFERRING, jobs.SUCCESS, changes)), set())
        self.assertEqual((yield self.store.transition_many(jobs.TRANSFERRING, jobs.SUCCESS, {})), set())
        self.assertRaises(jobs.InvalidTransition, self.store.transition_many, jobs.TRANSFERRING, jobs.ERROR,
                          {ids[0]: {}})  # ERROR needs a reason

    @defer.inlineCallbacks
    def test_claim_moves_a_fresh_job_as_it_leases_it(self):
        """claim leases a SUBMITTED job no worker took before and moves it to STAGING with the start's fields in
        the same call (history, metrics, the listeners woken); a job a worker took before, or one in another of
        the states, is only leased (a delivery counted); a job held by someone else, or unknown, is not taken."""
        from transferd.metrics import Metrics

        self.store.metrics = metrics = Metrics()
        woken = []
        self.store.listen_for_events(woken.append)
        start = (jobs.SUBMITTED, jobs.STAGING, {"stager_callback": "ab" * 32, "stage_attempts": 1}, "worker w")
        states, fresh = (jobs.SUBMITTED, jobs.STAGING), ("deliveries", "stage_attempts")
        job = yield self._submitted()
        del woken[:]  # (the new job's: False)
        self.clock.advance(7)
        claimed, moved = yield self.store.claim(job.job_id, states, "w", 60, start, fresh)
        self.assertTrue(moved)
        self.assertEqual((claimed.status, claimed.stager_callback, claimed.stage_attempts, claimed.lease_owner,
                          claimed.lease_until, claimed.deliveries),
                         (jobs.STAGING, "ab" * 32, 1, "w", self.clock.seconds() + 60, 1))
        self.assertEqual(claimed.time_staging.timestamp(), self.clock.seconds())
        self.assertEqual((yield self.store.get(job.job_id)), claimed)
        last = (yield self.store.events(job.job_id))[-1]
        self.assertEqual((last["old_status"], last["new_status"], last["actor"]),
                         (jobs.SUBMITTED, jobs.STAGING, "worker w"))
        self.assertEqual(metrics.transitions.labels(jobs.SUBMITTED, jobs.STAGING)._value.get(), 1)
        self.assertAlmostEqual(metrics.time_in_state.labels(jobs.SUBMITTED)._sum.get(), 7, places=3)
        self.assertEqual(woken, [True])
        # Held by w: nobody else takes it.
        self.assertEqual((yield self.store.claim(job.job_id, states, "v", 60, start, fresh)), (None, False))
        # A worker died on this one (its delivery never given back): leased again, not moved.
        crashed = yield self._submitted()
        yield self.store.take_lease(crashed.job_id, states, "dead", 1)
        self.clock.advance(2)
        taken, moved = yield self.store.claim(crashed.job_id, states, "w", 60, start, fresh)
        self.assertFalse(moved)
        self.assertEqual((taken.status, taken.deliveries, taken.lease_owner), (jobs.SUBMITTED, 2, "w"))
        # In STAGING and free (its lease ran out): leased, as take_lease does.
        yield self.store.end_lease(job.job_id, "w")
        taken, moved = yield self.store.claim(job.job_id, states, "w", 60, start, fresh)
        self.assertFalse(moved)
        self.assertEqual((taken.status, taken.lease_owner), (jobs.STAGING, "w"))
        self.assertEqual((yield self.store.claim(jobs.new_job_id(), states, "w", 60, start, fresh)), (None, False))
        self.assertEqual(metrics.transitions.labels(jobs.SUBMITTED, jobs.STAGING)._value.get(), 1)

    @defer.inlineCallbacks
    def test_copies_freed_many_at_once(self):
        """copies_freed sets time_copy_freed on the ended jobs among those given, once; it counts them."""
        ended = []
        for _ in range(3):
            job = yield self._submitted()
            yield self.store.transition(job.job_id, jobs.SUBMITTED, jobs.CANCELLED, {"detailed_status": "no"})
            ended.append(job.job_id)
        active = yield self._submitted()
        self.clock.advance(3)
        self.assertEqual((yield self.store.copies_freed([*ended, active.job_id])), 3)
        self.assertEqual((yield self.store.copies_freed(ended)), 0)
        self.assertEqual((yield self.store.copies_freed([])), 0)
        got = yield self.store.get(ended[1])
        self.assertEqual(got.time_copy_freed.timestamp(), self.clock.seconds())
        self.assertIsNone((yield self.store.get(active.job_id)).time_copy_freed)

    @defer.inlineCallbacks
    def test_transitions_measured(self):
        """With metrics, each transition counts once, with the seconds spent in the state left and, for SUCCESS,
        since submission, by the store's clock; a transition that matches no row counts nothing."""
        from transferd.metrics import Metrics

        self.store.metrics = metrics = Metrics()
        job = yield self._submitted()
        for old, new, seconds in ((jobs.SUBMITTED, jobs.STAGING, 7), (jobs.STAGING, jobs.STAGED, 30),
                                  (jobs.STAGED, jobs.TRANSFERRING, 2), (jobs.TRANSFERRING, jobs.SUCCESS, 600)):
            self.clock.advance(seconds)
            self.assertTrue((yield self.store.transition(job.job_id, old, new)))
            self.assertEqual(metrics.transitions.labels(old, new)._value.get(), 1)
            self.assertAlmostEqual(metrics.time_in_state.labels(old)._sum.get(), seconds, places=3)
        self.assertFalse((yield self.store.transition(job.job_id, jobs.TRANSFERRING, jobs.SUCCESS)))
        self.assertEqual(metrics.transitions.labels(jobs.TRANSFERRING, jobs.SUCCESS)._value.get(), 1)
        self.assertAlmostEqual(metrics.submit_to_success._sum.get(), 639, places=3)

    @defer.inlineCallbacks
    def test_recent_successes(self):
        """recent_successes() returns the latest jobs to a host that succeeded, submitted since a moment."""
        done = []
        for i in range(3):
            job = yield self._submitted(destination_path="davs://se.example.org/d")
            for old, new in ((jobs.SUBMITTED, jobs.STAGING), (jobs.STAGING, jobs.STAGED),
                             (jobs.STAGED, jobs.TRANSFERRING), (jobs.TRANSFERRING, jobs.SUCCESS)):
                yield self.store.transition(job.job_id, old, new)
            done.append(job.job_id)
            self.clock.advance(10)
        yield self._submitted(destination_path="davs://se.example.org/d")  # not done
        yield self._submitted(destination_path="davs://other.example.org/d")
        since = jobs.utc_from_seconds(self.clock.seconds() - 25)
        found = yield self.store.recent_successes("se.example.org", since, 10)
        self.assertEqual([job.job_id for job in found], [done[2], done[1]])
        self.assertEqual(len((yield self.store.recent_successes("se.example.org", since, 1))), 1)

    # -- what the dashboard sums up (transferd.dashboard) ---------------------------------

    @defer.inlineCallbacks
    def _ended(self, status, reason=None, **overrides):
        """A job taken through to status (SUCCESS through every state; ERROR or CANCELLED from SUBMITTED)."""
        job = yield self._submitted(**overrides)
        steps = ([(jobs.SUBMITTED, jobs.STAGING), (jobs.STAGING, jobs.STAGED), (jobs.STAGED, jobs.TRANSFERRING),
                  (jobs.TRANSFERRING, jobs.SUCCESS)] if status == jobs.SUCCESS else [(jobs.SUBMITTED, status)])
        for old, new in steps:
            fields = {"detailed_status": reason} if new == jobs.ERROR else {}
            if new == jobs.STAGED:
                fields["stager_hostname"] = "stager-1.example.org"
            yield self.store.transition(job.job_id, old, new, fields)
        return job

    @defer.inlineCallbacks
    def test_count_by_status_of_one_submitter(self):
        """count_by_status(submitter) counts only that submitter's jobs."""
        yield self._submitted(submitter="CN=Ann")
        yield self._ended(jobs.CANCELLED, submitter="CN=Ann")
        yield self._submitted(submitter="CN=Bob")
        self.assertEqual((yield self.store.count_by_status("CN=Ann")), {jobs.SUBMITTED: 1, jobs.CANCELLED: 1})
        self.assertEqual((yield self.store.count_by_status("CN=Nobody")), {})

    @defer.inlineCallbacks
    def test_activity_counts_submitted_and_ended_since(self):
        """activity() counts the jobs submitted after a moment and those that ended after it, by state."""
        yield self._ended(jobs.SUCCESS, submitter="CN=Ann")  # before the moment
        self.clock.advance(10)
        since = jobs.utc_from_seconds(self.clock.seconds())
        self.clock.advance(1)
        yield self._submitted(submitter="CN=Ann")
        yield self._ended(jobs.ERROR, "no space left", submitter="CN=Bob")
        yield self._ended(jobs.SUCCESS, submitter="CN=Ann")
        self.assertEqual((yield self.store.activity(since)),
                         {"submitted": 3, jobs.SUCCESS: 1, jobs.ERROR: 1, jobs.CANCELLED: 0})
        self.assertEqual((yield self.store.activity(since, "CN=Ann")),
                         {"submitted": 2, jobs.SUCCESS: 1, jobs.ERROR: 0, jobs.CANCELLED: 0})

    @defer.inlineCallbacks
    def test_counts_by_destination_and_stager(self):
        """counts_by() counts active jobs now and successes and failures since, per destination or stager host."""
        yield self._ended(jobs.ERROR, "old failure", destination_path="davs://se.example.org/d")  # before since
        self.clock.advance(10)
        since = jobs.utc_from_seconds(self.clock.seconds())
        self.clock.advance(1)
        yield self._submitted(destination_path="davs://se.example.org/d", submitter="CN=Ann")
        yield self._ended(jobs.SUCCESS, destination_path="davs://se.example.org/d", submitter="CN=Ann")
        yield self._ended(jobs.ERROR, "refused", destination_path="davs://se.example.org/d")
        yield self._ended(jobs.CANCELLED, destination_path="davs://se.example.org/d")  # neither success nor failure
        yield self._submitted(destination_path="file:///tmp/d", submitter="CN=Ann")
        self.assertEqual((yield self.store.counts_by("destination_host", since)),
                         {"se.example.org": {jobs.SUBMITTED: 1, jobs.SUCCESS: 1, jobs.ERROR: 1},
                          None: {jobs.SUBMITTED: 1}})
        self.assertEqual((yield self.store.counts_by("destination_host", since, "CN=Ann")),
                         {"se.example.org": {jobs.SUBMITTED: 1, jobs.SUCCESS: 1}, None: {jobs.SUBMITTED: 1}})
        self.assertEqual((yield self.store.counts_by("stager_hostname", since)),
                         {"stager-1.example.org": {jobs.SUCCESS: 1}, None: {jobs.SUBMITTED: 2, jobs.ERROR: 1}})
        self.assertRaises(ValueError, self.store.counts_by, "status; DROP TABLE jobs", since)

    @defer.inlineCallbacks
    def test_failure_reasons_and_recent_failures(self):
        """failure_reasons() ranks the reasons of jobs failed since a moment by count; recent_failures() lists
        those jobs, the latest first; both may be limited to one submitter."""
        yield self._ended(jobs.ERROR, "too old")
        self.clock.advance(10)
        since = jobs.utc_from_seconds(self.clock.seconds())
        failed = []
        for reason, submitter in (("disk full", "CN=Ann"), ("refused", "CN=Bob"), ("disk full", "CN=Bob")):
            self.clock.advance(1)
            failed.append((yield self._ended(jobs.ERROR, reason, submitter=submitter)))
        yield self._ended(jobs.SUCCESS)
        reasons = yield self.store.failure_reasons(since)
        self.assertEqual([(reason, count) for reason, count, _ in reasons], [("disk full", 2), ("refused", 1)])
        self.assertEqual(reasons[0][2].timestamp(), self.clock.seconds())
        self.assertEqual([(r, c) for r, c, _ in (yield self.store.failure_reasons(since, "CN=Ann"))], [("disk full", 1)])
        self.assertEqual(len((yield self.store.failure_reasons(since, limit=1))), 1)
        found = yield self.store.recent_failures(since, 10)
        self.assertEqual([job.job_id for job in found], [job.job_id for job in reversed(failed)])
        self.assertEqual([job.detailed_status for job in found], ["disk full", "refused", "disk full"])
        mine = yield self.store.recent_failures(since, 1, submitter="CN=Bob")
        self.assertEqual([job.job_id for job in mine], [failed[2].job_id])

    # -- the fleet (transferd.fleet) -------------------------------------------------

    def _daemon(self, **overrides):
        from transferd.fleet import DaemonInfo

        values = dict(daemon_id=jobs.new_job_id(), host="node-1.example.org", pid=4242, version="1.2.3",
                      time_started=jobs.utc_from_seconds(self.clock.seconds()))
        values.update(overrides)
        return DaemonInfo(**values)

    @defer.inlineCallbacks
    def test_heartbeats_and_drain_flag(self):
        """A beat inserts or refreshes a daemon's row and fires with its stored drain flag, which set_drain sets
        for the named daemons only; fleet lists the rows and forgets those silent since before its argument."""
        first, second = self._daemon(), self._daemon(host="node-2.example.org", pid=7)
        self.assertFalse((yield self.store.beat(first)))
        self.assertFalse((yield self.store.beat(second)))
        self.clock.advance(5)
        self.assertFalse((yield self.store.beat(first)))
        self.assertEqual((yield self.store.set_drain([second.daemon_id, "no-such-daemon"], True)), 1)
        self.assertTrue((yield self.store.beat(second)))  # the flag as stored wins over the daemon's own
        self.assertFalse((yield self.store.beat(first)))
        rows = {row.daemon_id: row for row in (yield self.store.fleet(0))}
        self.assertEqual(set(rows), {first.daemon_id, second.daemon_id})
        self.assertEqual((rows[second.daemon_id].host, rows[second.daemon_id].pid, rows[second.daemon_id].drain),
                         ("node-2.example.org", 7, True))
        self.assertEqual(rows[first.daemon_id].time_beat.timestamp(), self.clock.seconds())
        self.assertEqual(rows[first.daemon_id].time_started, first.time_started)
        self.clock.advance(100)
        yield self.store.beat(second)
        rows = yield self.store.fleet(self.clock.seconds() - 50)  # first has been silent for 100 s
        self.assertEqual([row.daemon_id for row in rows], [second.daemon_id])
        self.assertTrue((yield self.store.forget_daemon(second.daemon_id)))
        self.assertEqual((yield self.store.fleet(0)), [])

    @defer.inlineCallbacks
    def test_leases_by_owner(self):
        """leases_by_owner counts the active jobs under each live worker's lease, not queue holds, waits or
        expired leases."""
        worker_a, worker_b = leases.worker_owner("daemon-a"), leases.worker_owner("daemon-b")
        held = []
        for _ in range(4):
            held.append((yield self._submitted()))
        yield self._submitted()  # free
        queued = yield self._submitted()
        yield self.store.hold_in_queue(jobs.SUBMITTED, [queued.job_id], 60)
        for job, owner in zip(held, (worker_a, worker_a, worker_b, worker_b)):
            self.assertIsNotNone((yield self.store.take_lease(job.job_id, [jobs.SUBMITTED], owner, 30)))
        yield self.store.end_lease(held[3].job_id, worker_b, then=leases.waiting(60))
        self.assertEqual((yield self.store.leases_by_owner(jobs.ACTIVE)), {worker_a: 2, worker_b: 1})
        self.clock.advance(31)
        self.assertEqual((yield self.store.leases_by_owner(jobs.ACTIVE)), {})
