"""GET /api/v1/jobs/{id}: history, what the job waits for, and its ETA, with time on a task.Clock.

Jobs are put in each state through the store, as the workers would leave
them; the workers themselves are not started.
"""

import json
from twisted.internet import defer, task
from twisted.trial import unittest

from tests.harness import Harness
from transferd import jobs, leases

START = 1_800_000_000
SE = "davs://se.example.org/data"


def iso(seconds):
    return jobs.utc_from_seconds(seconds).isoformat().replace("+00:00", "Z")


class ExplainTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.h = Harness(self.mktemp(), {("reconciler", "interval"): "1000000"}, clock=self.clock)
        yield self.h.start(consume=False)
        self.addCleanup(self.h.close)
        self.store = self.h.store

    @defer.inlineCallbacks
    def new(self, destination=SE, **fields):
        job = jobs.Job(job_id=jobs.new_job_id(), product_id="sample-001", destination_path=destination, **fields)
        yield self.store.create(job, actor="CN=Ann")
        return job.job_id

    @defer.inlineCallbacks
    def move(self, job_id, *steps, hold=None, fields=None):
        """Walk the job through steps (states), each one second apart; the last one with hold and fields."""
        current = (yield self.store.get(job_id)).status
        for n, state in enumerate(steps):
            self.clock.advance(1)
            last = n == len(steps) - 1
            yield self.store.transition(job_id, current, state, fields if last else None, hold if last else None,
                                        actor="worker")
            current = state

    @defer.inlineCallbacks
    def detail(self, job_id):
        response, content = yield self.h.request("GET", f"/api/v1/jobs/{job_id}")
        self.assertEqual(response.code, 200, content)
        return json.loads(content)

    @defer.inlineCallbacks
    def waiting(self, job_id):
        return (yield self.detail(job_id))["waiting_for"]

    @defer.inlineCallbacks
    def test_queued_jobs_count_those_ahead(self):
        """A job the scheduler has not released waits for its fair share, behind the jobs of its share before it
        (priority, then age); once released, "queued" behind the released jobs in its state and its batch's."""
        first = yield self.new()
        self.clock.advance(1)
        second = yield self.new()
        self.clock.advance(1)
        third = yield self.new()
        waiting = yield self.waiting(third)
        self.assertEqual(waiting["reason"], "fair_share")
        self.assertTrue(waiting["message"].startswith("queued for staging: 2 job(s) of anonymous ahead of it;"
                                                      " anonymous (weight 1) has 0 job(s) in staging now"), waiting)
        batch_mate = yield self.new()  # submitted at the same instant, as a batch's jobs are
        ahead = set()
        for job_id in (third, batch_mate):
            ahead.add((yield self.waiting(job_id))["message"].split(" job(s)")[0])
        self.assertEqual(ahead, {"queued for staging: 2", "queued for staging: 3"})  # by job id within the instant
        yield self.store.hold_in_queue(jobs.SUBMITTED, [first, second, third, batch_mate], 300)  # released
        self.assertEqual((yield self.waiting(third)), {"reason": "queued", "message": "queued for staging: 3 job(s) ahead"})
        self.assertEqual((yield self.waiting(first)), {"reason": "queued", "message": "queued for staging: 0 job(s) ahead"})
        yield self.move(first, jobs.STAGING, jobs.STAGED, hold=leases.in_queue(30))
        yield self.move(third, jobs.STAGING, jobs.STAGED)
        waiting = yield self.waiting(third)
        self.assertEqual(waiting["reason"], "fair_share")
        self.assertTrue(waiting["message"].startswith("queued for transfer: 0 job(s) of anonymous ahead of it;"
                                                      " anonymous (weight 1) has 1 job(s) in transfer now"), waiting)
        self.assertEqual((yield self.waiting(batch_mate))["message"], "queued for staging: 1 job(s) ahead")

    @defer.inlineCallbacks
    def test_staging_explained(self):
        """A STAGING job says whether a worker stages it, the stager has it, the stager is retried, or it timed out."""
        job_id = yield self.new()
        yield self.store.take_lease(job_id, [jobs.SUBMITTED], "worker-1", 30)
        self.assertEqual((yield self.waiting(job_id)), {"reason": "staging_starting", "message": "being handed to the stager"})
        yield self.move(job_id, jobs.STAGING, hold=leases.worker("worker-1", 30), fields={"stage_attempts": 1})
        self.assertEqual((yield self.waiting(job_id)), {"reason": "staging", "message": "staging attempt 1 of 3 in progress"})
        yield self.store.end_lease(job_id, "worker-1", then=leases.waiting(3600))
        self.assertEqual((yield self.waiting(job_id)), {
            "reason": "staging",
            "message": f"staging attempt 1 of 3: the stager is at work; it has until {iso(self.clock.seconds() + 3600)}"})
        self.clock.advance(3601)  # the attempt timed out; a worker stages the job again, but the stager is away
        self.assertIsNotNone((yield self.store.take_lease(job_id, [jobs.STAGING], "worker-2", 30)))
        yield self.store.update(job_id, jobs.STAGING, {
            "stage_attempts": 2, "time_staging": jobs.utc_from_seconds(self.clock.seconds())})
        yield self.store.end_lease(job_id, "worker-2", then=leases.waiting(40))
        self.assertEqual((yield self.waiting(job_id)),
                         {"reason": "stager_retry", "message": "staging attempt 2 of 3: the stager is unavailable, retry in 40 s"})
        self.clock.advance(41)
        self.assertEqual((yield self.waiting(job_id)), {
            "reason": "staging_timed_out", "message": "staging attempt 2 of 3 timed out; it is about to be staged again"})
        yield self.store.update(job_id, jobs.STAGING, {"stage_attempts": 3})
        self.assertIn("no attempt is left", (yield self.waiting(job_id))["message"])

    @defer.inlineCallbacks
    def test_transfer_explained(self):
        """A STAGED or TRANSFERRING job says what the transfer waits for, FTS's progress included; an ended one nothing."""
        job_id = yield self.new()
        yield self.move(job_id, jobs.STAGING, jobs.STAGED, hold=leases.waiting(60))
        self.assertEqual((yield self.waiting(job_id)), {
            "reason": "transfer_retry", "message": "the transfer service is unavailable; trying again in 60 s"})
        yield self.move(job_id, jobs.TRANSFERRING)
        self.assertEqual((yield self.waiting(job_id)), {"reason": "transfer_active",
                                                        "message": "transferring to se.example.org"})
        files = [{"file_state": state} for state in ("FINISHED", "ACTIVE", "FINISHED", "SUBMITTED", "FINISHED")]
        yield self.store.update(job_id, jobs.TRANSFERRING, {"fts_jobid": "f-1"})
        self.assertEqual((yield self.waiting(job_id))["message"], "FTS job f-1 submitted; waiting for its first report")
        yield self.store.update(job_id, jobs.TRANSFERRING,
                                {"fts_details": json.dumps({"job_state": "ACTIVE", "files": files})})
        self.assertEqual((yield self.waiting(job_id)), {"reason": "transfer_active",
                                                        "message": "FTS job ACTIVE: 3 of 5 files done"})
        yield self.move(job_id, jobs.SUCCESS)
        view = yield self.detail(job_id)
        self.assertEqual((view["waiting_for"], view["eta"]), (None, None))

    @defer.inlineCallbacks
    def test_history(self):
        """The detail view lists the job's history, oldest first, with time, actor and reason."""
        job_id = yield self.new()
        yield self.move(job_id, jobs.STAGING)
        yield self.store.note(job_id, jobs.STAGING, "the tape system", "tape library busy")
        yield self.move(job_id, jobs.ERROR, fields={"detailed_status": "tape unreadable"})
        history = (yield self.detail(job_id))["history"]
        self.assertEqual(history, [
            {"kind": "state", "old_status": None, "new_status": jobs.SUBMITTED, "time": iso(START), "actor": "CN=Ann",
             "reason": None},
            {"kind": "state", "old_status": jobs.SUBMITTED, "new_status": jobs.STAGING, "time": iso(START + 1),
             "actor": "worker", "reason": None},
            {"kind": "attempt", "old_status": jobs.STAGING, "new_status": jobs.STAGING, "time": iso(START + 1),
             "actor": "the tape system", "reason": "tape library busy"},
            {"kind": "state", "old_status": jobs.STAGING, "new_status": jobs.ERROR, "time": iso(START + 2),
             "actor": "worker", "reason": "tape unreadable"},
        ])

    @defer.inlineCallbacks
    def test_eta_from_similar_jobs(self):
        """The ETA comes from recent successes to the same host: their rate and time from staging (or the state) to SUCCESS."""
        for _ in range(3):  # each: 1 s to STAGING, then 29 s to SUCCESS; one ends every 30 s
            done = yield self.new()
            yield self.move(done, jobs.STAGING)
            self.clock.advance(19)
            yield self.move(done, jobs.STAGED, jobs.TRANSFERRING)
            self.clock.advance(7)
            yield self.move(done, jobs.SUCCESS)
        elsewhere = yield self.new(destination="davs://other.example.org/d")
        self.assertIsNone((yield self.detail(elsewhere))["eta"])
        queued = []
        for _ in range(4):
            self.clock.advance(1)
            queued.append((yield self.new()))
        now = self.clock.seconds()
        # 3 successes 30 s apart: one job per 30 s; 4 SUBMITTED ahead of the last (one to another host, as the
        # queue is shared); staging to SUCCESS takes 29 s.
        self.assertEqual((yield self.detail(queued[-1]))["eta"], iso(now + 4 * 30 + 29))
        yield self.move(queued[0], jobs.STAGING)
        self.assertEqual((yield self.detail(queued[0]))["eta"], iso(self.clock.seconds() + 29))
        self.clock.advance(100)  # longer than similar jobs took: due now
        self.assertEqual((yield self.detail(queued[0]))["eta"], iso(self.clock.seconds()))

    @defer.inlineCallbacks
    def test_unknown_and_malformed_ids(self):
        """An unknown job id gets a 404 problem, a malformed one 400."""
        response, content = yield self.h.request("GET", f"/api/v1/jobs/{jobs.new_job_id()}")
        self.assertEqual((response.code, json.loads(content)["status"]), (404, 404))
        response, content = yield self.h.request("GET", "/api/v1/jobs/not-a-uuid")
        self.assertEqual((response.code, json.loads(content)["status"]), (400, 400))
