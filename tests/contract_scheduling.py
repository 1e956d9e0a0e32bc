"""The scheduling contract of every JobStore (transferd.scheduler): a pass releases the best jobs of each share
as the plan says, within destination host room, one pass at a time; expired leases go back to the scheduler;
a share's waiting cap refuses a submission whole.  Mixed into a TestCase with an async make_store(clock)."""

import collections

from twisted.internet import defer, task

from transferd import jobs, leases, scheduler
from transferd.store import schema
from transferd.scheduler import STAGING, TRANSFER, Limits, Policy, TooManyWaiting


def job(share, priority=3, host="a.example.org", **fields):
    return jobs.Job(job_id=jobs.new_job_id(), product_id="p", destination_path=f"https://{host}/d",
                    submitter=share, share=share, priority=priority, **fields)


class SchedulingContract:
    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.store = yield defer.Deferred.fromCoroutine(self.make_store(self.clock))
        self.addCleanup(self.store.pool.close)

    def run_pass(self, step, policy):
        return self.store.schedule(step, lambda counts: scheduler.plan(step, policy, counts),
                                   lambda room, host: scheduler.room_for(room, host, policy.limits),
                                   leases.in_queue(30), "daemon-1", hosts=scheduler.counts_hosts(step, policy.limits))

    @defer.inlineCallbacks
    def create(self, *new_jobs):
        for new in new_jobs:
            self.clock.advance(0.001)  # distinct ages
            yield self.store.create(new)
        return [new.job_id for new in new_jobs]

    @defer.inlineCallbacks
    def test_releases_by_priority_then_age_within_a_share(self):
        low_old, high_new, low_new = yield self.create(job("A", 2), job("A", 5), job("A", 2))
        released = yield self.run_pass(STAGING, Policy(queued_ahead=2))
        self.assertEqual(released, [high_new, low_old])
        held = yield self.store.get(high_new)
        self.assertEqual((held.lease_owner, held.lease_until), (leases.IN_QUEUE, self.clock.seconds() + 30))
        self.assertEqual((yield self.run_pass(STAGING, Policy(queued_ahead=2))), [])  # two ahead already
        self.assertEqual((yield self.run_pass(STAGING, Policy(queued_ahead=3))), [low_new])

    @defer.inlineCallbacks
    def test_water_filling_across_shares_counts_what_each_runs(self):
        a_ids = yield self.create(*[job("A") for _ in range(6)])
        b_ids = yield self.create(*[job("B") for _ in range(6)])
        for job_id in a_ids[:3]:  # A runs three already
            yield self.store.transition(job_id, jobs.SUBMITTED, jobs.STAGING)
        released = yield self.run_pass(STAGING, Policy(queued_ahead=5))
        self.assertEqual(sorted(released), sorted(b_ids[:4] + a_ids[3:4]))  # B catches up to 4, then one each

    @defer.inlineCallbacks
    def test_weights_and_the_staging_limit(self):
        yield self.create(*[job("A") for _ in range(10)], *[job("B") for _ in range(10)])
        policy = Policy(weights=((3.0, "B"),), queued_ahead=100, limits=Limits(max_staging=8))
        released = yield self.run_pass(STAGING, policy)
        shares = []
        for job_id in released:
            shares.append((yield self.store.get(job_id)).share)
        self.assertEqual((shares.count("A"), shares.count("B")), (2, 6))
        self.assertEqual((yield self.run_pass(STAGING, policy)), [])  # eight staging requests at once at most

    @defer.inlineCallbacks
    def test_destination_host_limit_lets_other_hosts_through(self):
        full = yield self.create(*[job("A", host="full.example.org") for _ in range(4)])
        other = yield self.create(*[job("A", host="other.example.org") for _ in range(2)])
        for job_id in full + other:
            yield self.store.transition(job_id, jobs.SUBMITTED, jobs.STAGING)
            yield self.store.transition(job_id, jobs.STAGING, jobs.STAGED)
        policy = Policy(queued_ahead=100, limits=Limits(host_limits=(("full.example.org", 2),)))
        released = yield self.run_pass(TRANSFER, policy)
        self.assertEqual(sorted(released), sorted(full[:2] + other))
        self.assertEqual((yield self.run_pass(TRANSFER, policy)), [])
        yield self.store.transition(full[0], jobs.STAGED, jobs.TRANSFERRING)
        yield self.store.transition(full[0], jobs.TRANSFERRING, jobs.SUCCESS)
        self.assertEqual((yield self.run_pass(TRANSFER, policy)), [full[2]])  # one slot freed: one more

    @defer.inlineCallbacks
    def test_transfers_per_submitter_cap(self):
        ids = yield self.create(*[job("A") for _ in range(5)])
        for job_id in ids:
            yield self.store.transition(job_id, jobs.SUBMITTED, jobs.STAGING)
            yield self.store.transition(job_id, jobs.STAGING, jobs.STAGED)
        policy = Policy(queued_ahead=100, limits=Limits(max_transfers_per_submitter=3))
        self.assertEqual(len((yield self.run_pass(TRANSFER, policy))), 3)
        self.assertEqual((yield self.run_pass(TRANSFER, policy)), [])

    @defer.inlineCallbacks
    def test_counts_and_ahead_in_share(self):
        first, second, third = yield self.create(job("A"), job("A"), job("B"))
        yield self.run_pass(STAGING, Policy(queued_ahead=1))
        counts = yield self.store.scheduling_counts(STAGING)
        self.assertEqual((counts.waiting, counts.released, counts.running), ({"A": 1, "B": 1}, {"A": 1}, {}))
        self.assertEqual((yield self.store.ahead_in_share((yield self.store.get(second)))), 0)
        yield self.create(job("A"))
        later = (yield self.store.list_jobs(jobs.JobFilter(statuses=(jobs.SUBMITTED,)), 1))[0]
        self.assertEqual((yield self.store.ahead_in_share(later)), 1)

    @defer.inlineCallbacks
    def test_expired_leases_go_back_to_the_scheduler(self):
        ids = yield self.create(job("A"), job("A"))
        yield self.run_pass(STAGING, Policy(queued_ahead=2))
        self.assertEqual((yield self.store.release_to_scheduler([jobs.SUBMITTED], 10)), 0)
        self.assertEqual((yield self.store.release_to_scheduler([jobs.SUBMITTED], 10, include_queue_holds=True)), 2)
        yield self.run_pass(STAGING, Policy(queued_ahead=2))
        self.clock.advance(31)
        self.assertEqual((yield self.store.release_to_scheduler([jobs.SUBMITTED], 10)), 2)
        self.assertEqual(sorted((yield self.run_pass(STAGING, Policy(queued_ahead=2)))), sorted(ids))

    @defer.inlineCallbacks
    def test_waiting_cap_refuses_a_whole_submission(self):
        yield self.create(job("A"), job("A"))
        with self.assertRaises(TooManyWaiting) as refused:
            yield self.store.create_many([job("A"), job("A")], max_waiting=(3, 30.0))
        self.assertEqual(refused.exception.retry_after, 30.0)
        self.assertIn("A has 2 job(s) waiting", str(refused.exception))
        self.assertEqual((yield self.store.count_by_status()), {jobs.SUBMITTED: 2})  # nothing created
        yield self.store.create_many([job("A")], max_waiting=(3, 30.0))
        yield self.store.create_many([job("B"), job("B"), job("B")], max_waiting=(3, 30.0))  # its own count

    @defer.inlineCallbacks
    def test_passes_run_one_at_a_time(self):
        """Two passes at once (two daemons) release no job twice and stay within the limit together."""
        yield self.create(*[job("A") for _ in range(20)])
        policy = Policy(queued_ahead=100, limits=Limits(max_staging=7))
        both = yield defer.gatherResults([self.run_pass(STAGING, policy), self.run_pass(STAGING, policy)])
        released = both[0] + both[1]
        self.assertEqual(len(released), 7)
        self.assertEqual(len(set(released)), 7)

    @defer.inlineCallbacks
    def test_polling_takes_only_the_slots_asked(self):
        """take_for_polling with slots takes the jobs whose poll slot is in them; the jobs of one staging request
        share the request's slot, so one daemon polls the request."""
        ids = yield self.create(*[job("A") for _ in range(40)])
        for job_id in ids:
            yield self.store.transition(job_id, jobs.SUBMITTED, jobs.STAGING)
        for job_id in ids[:20]:
            yield self.store.record_stager_request(job_id, "request-1")
        low = yield self.store.take_for_polling(jobs.STAGING, "poller-low", lambda age: 60, 100, slots=(0, 512))
        high = yield self.store.take_for_polling(jobs.STAGING, "poller-high", lambda age: 60, 100, slots=(512, 1024))
        self.assertEqual(sorted(j.job_id for j in low + high), sorted(ids))
        self.assertTrue(all(j.poll_slot < 512 for j in low) and all(j.poll_slot >= 512 for j in high))
        slot = schema.poll_slot("request-1")
        self.assertEqual({j.poll_slot for j in low + high if j.job_id in ids[:20]}, {slot})
        self.assertEqual({schema.poll_slot(j.job_id) for j in low + high if j.job_id in ids[20:]},
                         {j.poll_slot for j in low + high if j.job_id in ids[20:]})

    @defer.inlineCallbacks
    def assert_counts_are_the_jobs(self, fold):
        """What the passes and /metrics read (job_counts plus the changes not folded in) is the jobs' own count."""
        if fold:
            yield self.store.fold_job_counts()
        rows = yield self.store.pool.runQuery(
            "SELECT status, lease_until IS NOT NULL, share, destination_host FROM jobs")
        rows = [(status, bool(held), share, host) for status, held, share, host in rows]
        self.assertEqual((yield self.store.count_by_status()), dict(collections.Counter(row[0] for row in rows)))
        for step in (STAGING, TRANSFER):
            counts = yield self.store.scheduling_counts(step, hosts=True)
            expected = (
                collections.Counter(share for status, held, share, _ in rows if status == step.waiting and not held),
                collections.Counter(share for status, held, share, _ in rows if status == step.waiting and held),
                collections.Counter(share for status, _, share, _ in rows if status in step.running),
                collections.Counter(host for status, held, _, host in rows
                                    if status in step.running or (status == step.waiting and held)),
            )
            self.assertEqual((counts.waiting, counts.released, counts.running, counts.hosts),
                             tuple(dict(counter) for counter in expected), step.name)

    @defer.inlineCallbacks
    def test_kept_counts_follow_every_change(self):
        """The kept counts (schema version 9's triggers) follow submissions, passes, leases, transitions, expired
        holds, cancellations and purges, whether their changes are folded in yet or not."""
        a = yield self.create(*[job("A", host="a.example.org") for _ in range(4)])
        b = yield self.create(*[job("B", host="b.example.org") for _ in range(3)])
        yield self.assert_counts_are_the_jobs(fold=False)
        yield self.run_pass(STAGING, Policy(queued_ahead=4))  # some of each share under a queue hold
        yield self.assert_counts_are_the_jobs(fold=True)
        owner = leases.worker("daemon-1", 30).owner
        yield self.store.take_lease(a[0], [jobs.SUBMITTED], owner, 30)
        yield self.store.transition(a[0], jobs.SUBMITTED, jobs.STAGING, hold=leases.worker("daemon-1", 30))
        yield self.store.transition(b[0], jobs.SUBMITTED, jobs.STAGING)
        yield self.assert_counts_are_the_jobs(fold=False)
        yield self.store.transition(a[0], jobs.STAGING, jobs.STAGED)
        yield self.store.transition(b[0], jobs.STAGING, jobs.STAGED)
        yield self.run_pass(TRANSFER, Policy(queued_ahead=1))
        yield self.assert_counts_are_the_jobs(fold=True)
        yield self.store.transition(a[0], jobs.STAGED, jobs.TRANSFERRING, hold=leases.waiting(600))
        yield self.store.end_lease(b[0], leases.IN_QUEUE)
        yield self.store.transition(b[2], jobs.SUBMITTED, jobs.CANCELLED)
        yield self.assert_counts_are_the_jobs(fold=False)
        self.clock.advance(31)  # the queue holds run out: back to the scheduler
        self.assertGreater((yield self.store.release_to_scheduler([jobs.SUBMITTED, jobs.STAGED], 10)), 0)
        yield self.store.transition(a[0], jobs.TRANSFERRING, jobs.SUCCESS)
        yield self.assert_counts_are_the_jobs(fold=True)
        self.clock.advance(10)
        self.assertEqual((yield self.store.purge_ended(jobs.utc_from_seconds(self.clock.seconds()), 10)), 2)
        yield self.assert_counts_are_the_jobs(fold=False)
        yield self.assert_counts_are_the_jobs(fold=True)
        self.assertEqual((yield self.store.fold_job_counts()), 0)  # nothing left to fold
