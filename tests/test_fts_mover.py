"""The FTS mover and its poller in a daemon built by transferd.wiring (SQLite store, pipeline), against the fake FTS3.

The fake FTS3 answers over real loopback HTTP(S); time (the fake's job
durations and held answers, leases, polling holds, transfer timeouts) runs on
one task.Clock that the tests advance.
"""

import json
import math
import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from transferd import jobs
from transferd.config import ConfigError, load_config
from transferd.fts.client import FTSUnavailable, deterministic_job_id
from transferd.fts.poller import FTSPoller
from transferd.interfaces import ServiceAway
from transferd.jobs import Job, StagedFile
from transferd.movers.fts import FTSMover, from_config
from transferd.testing.fakefts import FakeFTSServer, TestPKI
from transferd.testing.tokens import TokenIssuer
from transferd.wiring import build
from tests.support import wait_for
from tests.test_pipeline import ScriptedStager

TOKEN = "mover-token"
DESTINATION = "davs://dest.example.org:2880/deliveries"


class MoverTestCase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.token_file = os.path.join(self.base, "token")
        with open(self.token_file, "w") as handle:
            handle.write(TOKEN)
        self.clock = task.Clock()
        self.clock.advance(reactor.seconds())

    async def start(self, fts=None, tls_options=None, **fake_options):
        """Start the fake FTS3, then build the daemon (store, pipeline, FTS mover, poller) and start its store and mover.

        fts: [fts] settings over the test's (token auth, poll_interval 0.05, bulk_size 10, transfer_timeout 3600).
        """
        fake_options.setdefault("token", TOKEN)
        self.server = FakeFTSServer(reactor, tls_options=tls_options, clock=self.clock, **fake_options)
        await self.server.start()
        self.addCleanup(self.server.stop)
        self.fake = self.server.fake
        settings = {"endpoint": self.server.url, "auth": "token", "token_file": self.token_file,
                    "poll_interval": "0.05", "bulk_size": "10", "transfer_timeout": "3600"}
        settings.update(fts or {})
        config = load_config(None, {
            ("database", "url"): "sqlite:///" + os.path.join(self.base, "jobs.sqlite"),
            ("transfer", "backend"): "fts", ("transfer", "allowed_schemes"): "davs, gsiftp",
            ("reconciler", "lease"): "5",
            ("stager", "archive_root"): self.base, ("stager", "staging_root"): self.base,
            **{("fts", key): value for key, value in settings.items()},
        })
        self.stager = ScriptedStager()
        self.stager.answer = None  # staging "reported later": these jobs are made STAGED by hand
        daemon = build(config, reactor, self.clock, stager=self.stager)
        self.store, self.pipeline, self.mover = daemon.store, daemon.pipeline, daemon.mover
        (self.poller,) = daemon.pollers
        self.client = self.mover.client
        await self.store.startService()
        self.addCleanup(self.store.stopService)
        self.mover.startService()
        self.addCleanup(self.mover.stopService)
        if self.client.auth == "token" and "vo" not in (fts or {}):
            self.vo = await self.client.vo()  # learnt once: forced answers below then meet the call they mean

    async def staged(self, product="prod", files=None, job_id=None):
        """A STAGED job whose product was staged to stager.example.org:/staging/<job>/<product>."""
        job_id = job_id or jobs.new_job_id()
        files = files if files is not None else [(product, 11, "adler32:0000000b")]
        await self.store.create(Job(job_id, product, DESTINATION))
        await self.store.transition(job_id, jobs.SUBMITTED, jobs.STAGING)
        staged_files = [StagedFile(path, size, checksum).to_dict() for path, size, checksum in files]
        await self.store.transition(job_id, jobs.STAGING, jobs.STAGED, {
            "stager_hostname": "stager.example.org",
            "stager_path": f"/staging/{job_id}/{product}",
            "staged_files": json.dumps(staged_files) if staged_files else None,
        })
        return await self.store.get(job_id)

    async def job(self, job_id):
        return await self.store.get(job_id)

    async def poll_until_ended(self, job_ids, step=1.0, cycles=20):
        """Advance the clock by step and run a polling cycle, until every job has ended."""
        for _ in range(cycles):
            self.clock.advance(step)
            await self.poller.poll_once()
            views = {job_id: await self.store.get(job_id) for job_id in job_ids}
            if all(view.terminal for view in views.values()):
                return views
        self.fail(f"jobs still running after {cycles} cycles: {views}")


class SubmissionTests(MoverTestCase):
    def test_one_fts_job_per_product(self):
        """A directory product is one FTS job: one file entry per staged file, sizes and checksums included."""
        mover = FTSMover(client=None, store=None, clock=reactor, source_template="davs://{staged_to}:2880{path}")
        job = Job("job-1", "prod", DESTINATION + "/", status=jobs.STAGED, stager_hostname="stager.example.org",
                  stager_path="/staging/job-1/prod",
                  staged_files=json.dumps([StagedFile("prod/a b.dat", 5, "adler32:00000001").to_dict(),
                                           StagedFile("prod/sub/c", 7).to_dict()]))
        body = mover.submission(job)
        self.assertEqual([f["sources"] for f in body["files"]], [
            ["davs://stager.example.org:2880/staging/job-1/prod/a%20b.dat"],
            ["davs://stager.example.org:2880/staging/job-1/prod/sub/c"]])
        self.assertEqual([f["destinations"] for f in body["files"]], [
            [DESTINATION + "/prod/a%20b.dat"], [DESTINATION + "/prod/sub/c"]])
        self.assertEqual(body["files"][0]["filesize"], 5)
        self.assertEqual(body["files"][0]["checksum"], "adler32:00000001")
        self.assertNotIn("checksum", body["files"][1])
        self.assertEqual(body["files"][1]["metadata"], {"transferd_job_id": "job-1", "path": "prod/sub/c"})
        self.assertEqual(body["params"], {
            "id_generator": "deterministic", "sid": "job-1",
            "job_metadata": {"transferd_job_id": "job-1", "product_id": "prod"},
            "verify_checksum": "both", "overwrite": False, "retry": 0, "priority": 3})

    def test_files_outside_the_product_are_refused(self):
        """A staged file list naming paths outside the product fails the job instead of submitting it."""
        mover = FTSMover(client=None, store=None, clock=reactor)
        job = Job("job-1", "prod", DESTINATION, stager_hostname="h", stager_path="/staging/job-1/prod",
                  staged_files=json.dumps([{"path": "prod/../../etc/passwd"}]))
        result = mover.submission(job)
        self.assertFalse(result.success)
        self.assertIn("outside the product", result.msg)
        self.assertFalse(mover.submission(Job("job-2", "prod", DESTINATION)).success)

    async def test_id_recorded_before_the_post(self):
        """The predicted FTS id is in the store while the POST is still unanswered, and it is FTS's id."""
        await self.start(submit_delay=0.5)
        job = await self.staged()
        submitting = defer.Deferred.fromCoroutine(self.pipeline.transfer(job.job_id))
        await wait_for(lambda: self.fake.jobs_for_sid(job.job_id), 5)  # the POST has arrived
        pending = await self.job(job.job_id)
        self.assertEqual(pending.status, jobs.STAGED)
        self.assertEqual(pending.fts_jobid, self.fake.jobs_for_sid(job.job_id)[0]["job_id"])
        self.assertNoResult(submitting)
        self.clock.advance(0.5)  # FTS answers
        await submitting
        done = await self.job(job.job_id)
        self.assertEqual((done.status, done.fts_jobid), (jobs.TRANSFERRING, pending.fts_jobid))
        self.assertEqual(done.fts_jobid, deterministic_job_id(self.vo, job.job_id))
        fts_job = self.fake.jobs[done.fts_jobid]
        self.assertEqual(fts_job["_files"][0]["source_surl"],
                         f"gsiftp://stager.example.org/staging/{job.job_id}/prod")
        self.assertEqual(fts_job["_files"][0]["dest_surl"], DESTINATION + "/prod")
        self.assertEqual(fts_job["job_metadata"]["transferd_job_id"], job.job_id)

    async def test_resubmission_after_a_crash_is_not_a_duplicate(self):
        """Submitted but not recorded (a crash): submitting again gets 409, counts as accepted, one FTS job."""
        await self.start()
        job = await self.staged()
        self.assertIsNone(await self.mover.transfer(job))  # FTS has it; the daemon "dies" before recording
        self.assertEqual((await self.job(job.job_id)).status, jobs.STAGED)
        await self.pipeline.transfer(job.job_id)
        after = await self.job(job.job_id)
        self.assertEqual(after.status, jobs.TRANSFERRING)
        self.assertEqual(self.fake.count("POST", "/jobs"), 2)
        self.assertEqual(len(self.fake.jobs_for_sid(job.job_id)), 1)
        self.assertEqual(self.fake.submissions[job.job_id], 1)

    async def test_refusal_ends_in_error(self):
        """A 4xx from FTS ends the job in ERROR with FTS's message."""
        await self.start()
        job = await self.staged()
        self.fake.respond_next(403, body=b'{"status": "403 Forbidden", "message": "gsiftp://dest is banned"}')
        await self.pipeline.transfer(job.job_id)
        after = await self.job(job.job_id)
        self.assertEqual(after.status, jobs.ERROR)
        self.assertIn("gsiftp://dest is banned", after.detailed_status)
        self.assertEqual(json.loads(after.fts_details)["http_status"], 403)
        self.assertEqual(self.stager.released, [job.job_id])

    async def test_unavailable_fts_leaves_the_job_staged(self):
        """5xx or a dead FTS are ServiceAway: the job stays STAGED, waits poll_interval, and goes through once FTS is back."""
        await self.start()
        job = await self.staged()
        self.fake.respond_next(500)
        with self.assertRaises(ServiceAway) as caught:
            await self.mover.transfer(job)
        self.assertEqual(caught.exception.retry_after, self.mover.poll_interval)
        self.assertIsInstance(caught.exception.__cause__, FTSUnavailable)
        self.assertIn("HTTP 500", str(caught.exception))
        await self.server.stop_listening()
        await self.pipeline.transfer(job.job_id)  # the pipeline leaves it waiting retry_after
        still = await self.job(job.job_id)
        self.assertEqual((still.status, still.lease_owner), (jobs.STAGED, None))
        self.assertEqual(still.lease_until, self.clock.seconds() + self.mover.poll_interval)
        await self.pipeline.transfer(job.job_id)  # still waiting: nobody takes it
        self.assertEqual(self.fake.count("POST", "/jobs"), 1)
        await self.server.start()
        for _ in range(5):  # a connection the pool kept from before the outage may fail once
            self.clock.advance(self.mover.poll_interval)
            await self.pipeline.transfer(job.job_id)
            if (await self.job(job.job_id)).status == jobs.TRANSFERRING:
                break
        self.assertEqual((await self.job(job.job_id)).status, jobs.TRANSFERRING)
        self.assertEqual(len(self.fake.jobs), 1)

    async def test_transferring_jobs_are_never_posted_again(self):
        """A TRANSFERRING job handed to the mover again (a re-drive) is left to the poller: no POST."""
        await self.start(slow=["/prod=600"])
        job = await self.staged()
        await self.pipeline.transfer(job.job_id)
        self.assertEqual((await self.job(job.job_id)).status, jobs.TRANSFERRING)
        self.assertIsNone(await self.mover.transfer(await self.job(job.job_id)))
        self.assertEqual(self.fake.count("POST", "/jobs"), 1)

    async def test_cancelled_while_submitting(self):
        """A job cancelled while its POST is pending has its FTS job cancelled once FTS answers."""
        await self.start(submit_delay=0.3, slow=["/prod=600"])
        job = await self.staged()
        submitting = defer.Deferred.fromCoroutine(self.pipeline.transfer(job.job_id))
        await wait_for(lambda: self.fake.jobs_for_sid(job.job_id), 5)  # the POST has arrived
        await self.pipeline.cancel(job.job_id)
        self.clock.advance(0.3)  # FTS answers
        await submitting
        self.assertEqual((await self.job(job.job_id)).status, jobs.CANCELLED)
        self.assertEqual(self.fake.jobs_for_sid(job.job_id)[0]["job_state"], "CANCELED")
        self.assertGreaterEqual(self.fake.count("DELETE", "/jobs/{ids}"), 1)

    async def test_configured_vo_ftss_disagrees_with(self):
        """A configured [fts] vo that FTS contradicts submits nothing: the job waits STAGED, the error naming [fts] vo."""
        await self.start(fts={"vo": "not-the-fts-vo"})
        job = await self.staged()
        with self.assertRaises(ServiceAway) as caught:
            await self.mover.transfer(job)
        self.assertIn("[fts] vo = not-the-fts-vo", str(caught.exception))
        await self.pipeline.transfer(job.job_id)
        after = await self.job(job.job_id)
        self.assertEqual((after.status, after.fts_jobid), (jobs.STAGED, None))
        self.assertEqual(self.fake.count("POST", "/jobs"), 0)

    async def test_token_fts_takes_for_anonymous_keeps_the_job_staged(self):
        """A token FTS no longer accepts (anonymous: 403) leaves the job STAGED, not ERROR; a renewed token submits it."""
        await self.start()
        job = await self.staged()
        self.fake.tokens = {"renewed-token"}
        await self.pipeline.transfer(job.job_id)
        after = await self.job(job.job_id)
        self.assertEqual((after.status, after.lease_owner), (jobs.STAGED, None))
        self.assertGreater(after.lease_until, self.clock.seconds(), "waiting")
        self.clock.advance(600)
        await self.pipeline.transfer(job.job_id)
        self.assertEqual(self.fake.count("POST", "/jobs"), 1, "the refused token is not sent again")
        with open(self.token_file, "w") as handle:
            handle.write("renewed-token")
        self.clock.advance(600)
        await self.pipeline.transfer(job.job_id)
        self.assertEqual((await self.job(job.job_id)).status, jobs.TRANSFERRING)
        self.assertEqual(self.fake.count("POST", "/jobs"), 2)

    async def test_an_id_recorded_in_another_vo_is_asked_about_first(self):
        """When the VO changed since a job's id was recorded (a new token), FTS is asked about that id: no second FTS job."""
        issuers = [TokenIssuer(f"https://{host}/") for host in ("iam.one.example", "iam.two.example")]
        first, second = (issuer.token(lifetime=30 * 86400, now=self.clock.seconds()) for issuer in issuers)
        with open(self.token_file, "w") as handle:
            handle.write(first)
        await self.start(token=None, tokens=[first, second], slow=["/prod=600"])
        job = await self.staged()
        self.assertIsNone(await self.mover.transfer(job))  # FTS has it; the daemon "dies" before recording it
        recorded = (await self.job(job.job_id)).fts_jobid
        self.assertEqual(recorded, deterministic_job_id("iam.one.example", job.job_id))
        with open(self.token_file, "w") as handle:
            handle.write(second)
        await self.pipeline.transfer(job.job_id)
        after = await self.job(job.job_id)
        self.assertEqual((after.status, after.fts_jobid), (jobs.TRANSFERRING, recorded))
        self.assertEqual((self.fake.count("POST", "/jobs"), self.fake.submissions[job.job_id]), (1, 1))

    async def test_x509_submission_delegates(self):
        """With X.509 the mover's first submission delegates a proxy to FTS, then submits."""
        pki = TestPKI.create(os.path.join(self.base, "pki"))
        await self.start(tls_options=pki.server_options(), auth="x509", token=None, fts={
            "auth": "x509", "token_file": "", "cert": pki.user_cert, "key": pki.user_key, "ca_path": pki.ca})
        job = await self.staged()
        await self.pipeline.transfer(job.job_id)
        self.assertEqual((await self.job(job.job_id)).status, jobs.TRANSFERRING)
        self.assertEqual(self.fake.count("PUT", "/delegation/{id}/credential"), 1)


class PollerTests(MoverTestCase):
    async def test_outcomes(self):
        """FINISHED is SUCCESS; FAILED, FINISHEDDIRTY, CANCELED and a lost job are ERROR with FTS's reasons."""
        await self.start(duration=0.05, fail=["/bad=FAILED:SOURCE [2] simulated no such file",
                                              "/stop=CANCELED:cancelled by an operator", "/gone=LOST"])
        cases = {
            "ok": await self.staged("ok", [("ok/a", 3, None), ("ok/b", 4, None)]),
            "failed": await self.staged("bad", [("bad", 1, None)]),
            "dirty": await self.staged("dirty", [("dirty/fine", 1, None), ("dirty/bad", 1, None)]),
            "cancelled": await self.staged("stop"),
            "lost": await self.staged("gone"),
        }
        for job in cases.values():
            await self.pipeline.transfer(job.job_id)
        views = await self.poll_until_ended([job.job_id for job in cases.values()])
        view = {name: views[job.job_id] for name, job in cases.items()}
        self.assertEqual({name: v.status for name, v in view.items()},
                         {"ok": "SUCCESS", "failed": "ERROR", "dirty": "ERROR", "cancelled": "ERROR", "lost": "ERROR"})
        self.assertIn("FTS delivered 2 file(s), 7 bytes", view["ok"].detailed_status)
        details = json.loads(view["ok"].fts_details)
        self.assertEqual((details["job_state"], len(details["files"])), ("FINISHED", 2))
        self.assertIn("ended FAILED", view["failed"].detailed_status)
        self.assertIn("SOURCE [2] simulated no such file", view["failed"].detailed_status)
        self.assertIn("ended FINISHEDDIRTY", view["dirty"].detailed_status)
        self.assertIn("1 of 2 file(s) not delivered: dirty/bad: FAILED: SOURCE [2]", view["dirty"].detailed_status)
        self.assertEqual(json.loads(view["dirty"].fts_details)["job_state"], "FINISHEDDIRTY")
        self.assertIn("ended CANCELED", view["cancelled"].detailed_status)
        self.assertIn("lost by FTS", view["lost"].detailed_status)
        self.assertEqual(sorted(self.stager.released), sorted(job.job_id for job in cases.values()))

    async def test_multistatus_mixture_in_one_request(self):
        """One bulk request answering 207 (one job unknown, one running, one finished) settles each right."""
        await self.start(duration=0, slow=["/slow=60"], fail=["/gone=LOST"])
        finished, running, lost = (await self.staged("fine"), await self.staged("slow"), await self.staged("gone"))
        for job in (finished, running, lost):
            await self.pipeline.transfer(job.job_id)
        finished_id = deterministic_job_id(self.vo, finished.job_id)
        self.clock.advance(1)
        self.assertEqual((self.fake.jobs[finished_id]["job_state"], len(self.fake.lost)), ("FINISHED", 1))
        before = self.fake.count("GET", "/jobs/{ids}")
        summary = await self.poller.poll_once()
        self.assertEqual(summary, {"jobs": 3, "requests": 1, "reported": 2})
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}") - before, 1)
        self.assertEqual((await self.job(finished.job_id)).status, jobs.SUCCESS)
        self.assertEqual((await self.job(running.job_id)).status, jobs.TRANSFERRING)
        self.assertIn("lost by FTS", (await self.job(lost.job_id)).detailed_status)

    async def test_a_polls_finished_jobs_move_together(self):
        """25 jobs FTS finished (bulk_size 10: 3 requests), 2 of them FAILED: each request's successes move in
        one store transition_many and its failures in another, no job by a transition of its own; every
        job's copy is freed and recorded with one copies_freed a request."""
        await self.start(duration=0, fail=["/bad=FAILED:SOURCE [2] simulated no such file"])
        cases = [await self.staged("bad" if n in (3, 17) else "fine") for n in range(25)]
        for job in cases:
            await self.pipeline.transfer(job.job_id)
        calls = {"transition_many": [], "transition": 0, "copies_freed": []}
        transition_many, transition, copies_freed = (self.store.transition_many, self.store.transition,
                                                     self.store.copies_freed)

        def many(old, new, changes, actor=None):
            calls["transition_many"].append((new, len(changes)))
            return transition_many(old, new, changes, actor)

        def one(*args, **kwargs):
            calls["transition"] += 1
            return transition(*args, **kwargs)

        def freed(job_ids):
            calls["copies_freed"].append(len(job_ids))
            return copies_freed(job_ids)

        self.store.transition_many, self.store.transition, self.store.copies_freed = many, one, freed
        self.clock.advance(1)
        summary = await self.poller.poll_once()
        self.assertEqual(summary, {"jobs": 25, "requests": 3, "reported": 25})
        self.assertEqual(calls["transition"], 0)
        moved = {new: [count for kind, count in calls["transition_many"] if kind == new] for new in jobs.TERMINAL}
        self.assertEqual((sum(moved[jobs.SUCCESS]), len(moved[jobs.SUCCESS])), (23, 3))  # a call per request
        self.assertEqual(sum(moved[jobs.ERROR]), 2)
        self.assertLessEqual(len(moved[jobs.ERROR]), 2)  # (both may be in one request)
        self.assertEqual(sorted(calls["copies_freed"]), [5, 10, 10])
        ended = {job.job_id: await self.store.get(job.job_id) for job in cases}
        self.assertEqual(sorted(view.status for view in ended.values()), [jobs.ERROR] * 2 + [jobs.SUCCESS] * 23)
        self.assertTrue(all(view.time_copy_freed is not None for view in ended.values()))
        self.assertEqual(sorted(self.stager.released), sorted(ended))

    async def transferring_at_fts(self, count):
        """count jobs TRANSFERRING in the store, each with a slow FTS job of its own (submitted to the fake at once)."""
        semaphore = defer.DeferredSemaphore(32)
        ids = [jobs.new_job_id() for _ in range(count)]

        def submit(sid):
            body = {"files": [{"sources": [f"gsiftp://s/slow/{sid}"], "destinations": [f"gsiftp://d/x/{sid}"]}],
                    "params": {"id_generator": "deterministic", "sid": sid}}
            return defer.Deferred.fromCoroutine(self.client.submit(body))

        await defer.gatherResults([semaphore.run(submit, sid) for sid in ids], consumeErrors=True)
        now = self.store._time_to_db(jobs.utc_from_seconds(self.clock.seconds()))

        def insert(cursor):
            cursor.executemany(
                "INSERT INTO jobs (job_id, product_id, destination_path, status, fts_jobid, stage_attempts,"
                " time_submitted, time_transferring) VALUES (?, 'slow', ?, 'TRANSFERRING', ?, 1, ?, ?)",
                [(i, DESTINATION, deterministic_job_id(self.vo, i), now, now) for i in ids])

        await self.store.pool.runInteraction(insert)

    async def test_bulk_polling_cost(self):
        """1000 TRANSFERRING jobs cost ceil(1000 / 103) GET requests per cycle when bulk_size is larger: no 404 from Apache."""
        await self.start(slow=["/slow=600"])
        self.poller.bulk_size = 500
        self.poller.poll_interval = 30  # one cycle's hold lasts, so a second cycle finds nothing to poll
        await self.transferring_at_fts(1000)
        before = self.fake.count("GET", "/jobs/{ids}")
        summary = await self.poller.poll_once()
        self.assertEqual(summary["jobs"], 1000)
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}") - before, math.ceil(1000 / 103))
        self.assertEqual((summary["reported"], self.fake.requests["too long"]), (0, 0))
        self.assertEqual((await self.poller.poll_once())["requests"], 0, "taken for this cycle")

    async def test_a_full_batch_is_followed_by_another(self):
        """With more jobs due than a batch takes (poll_limit), one cycle asks about them all, batch after batch."""
        await self.start(slow=["/slow=600"])
        self.poller.poll_limit = 10
        self.poller.poll_interval = 30
        await self.transferring_at_fts(35)
        before = self.fake.count("GET", "/jobs/{ids}")
        summary = await self.poller.poll_once()
        self.assertEqual((summary["jobs"], summary["requests"]), (35, 4))  # batches of 10, 10, 10 and 5
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}") - before, 4)
        self.assertEqual((await self.poller.poll_once())["jobs"], 0, "every job asked about once this interval")

    async def test_a_long_running_transfer_is_asked_about_less_often(self):
        """A transfer is polled every poll_interval while young; its interval doubles while under a tenth of its
        age, up to max_poll_interval (poll_interval 10 s, max 40 s: every 10 s until 200 s, every 20 s until
        400 s, then every 40 s)."""
        await self.start(slow=["/slow=100000"])
        self.poller.poll_interval, self.poller.max_poll_interval = 10, 40
        job = await self.staged("slow")
        await self.pipeline.transfer(job.job_id)
        self.clock.advance(0.5)  # the cycles' ages clear of the boundaries (200 s, 400 s), which times round to
        polled_at = []
        for elapsed in range(0, 600, 10):  # one cycle every poll_interval, as the timer runs them
            if (await self.poller.poll_once())["jobs"]:
                polled_at.append(elapsed)
            self.clock.advance(10)
        self.assertEqual(polled_at, list(range(0, 200, 10)) + list(range(200, 400, 20)) + list(range(400, 600, 40)))
        self.assertEqual((await self.job(job.job_id)).status, jobs.TRANSFERRING)

    async def test_timeout_cancels_then_errors(self):
        """A job still running past transfer_timeout is DELETEd at FTS, then ends in ERROR."""
        await self.start(slow=["/slow=100000"])
        job = await self.staged("slow")
        await self.pipeline.transfer(job.job_id)
        self.clock.advance(10)
        self.assertEqual((await self.poller.poll_once())["reported"], 0, "not overdue yet")
        self.assertEqual(self.fake.count("DELETE", "/jobs/{ids}"), 0)
        self.clock.advance(3600)
        self.fake.respond_next(200, body=json.dumps([{"job_id": deterministic_job_id(self.vo, job.job_id),
                                                      "job_state": "ACTIVE", "http_status": "200 Ok"}]).encode())
        self.fake.respond_next(503)  # the DELETE: FTS cannot be told, so the job waits for the next cycle
        self.clock.advance(1)
        await self.poller.poll_once()
        self.assertEqual((await self.job(job.job_id)).status, jobs.TRANSFERRING)
        self.clock.advance(1)
        self.assertEqual((await self.poller.poll_once())["jobs"], 0, "an hour-old transfer waits its longer interval")
        self.clock.advance(self.poller.max_poll_interval)
        self.assertEqual((await self.poller.poll_once())["reported"], 1)
        after = await self.job(job.job_id)
        self.assertEqual(after.status, jobs.ERROR)
        self.assertIn("transfer timed out after 3600s", after.detailed_status)
        self.assertEqual(self.fake.jobs[after.fts_jobid]["job_state"], "CANCELED")
        self.assertEqual(self.fake.count("DELETE", "/jobs/{ids}"), 2)

    async def test_cancel_deletes_the_fts_job(self):
        """Cancelling a TRANSFERRING job DELETEs its FTS job."""
        await self.start(slow=["/slow=600"])
        job = await self.staged("slow")
        await self.pipeline.transfer(job.job_id)
        await self.pipeline.cancel(job.job_id)
        after = await self.job(job.job_id)
        self.assertEqual(after.status, jobs.CANCELLED)
        self.assertEqual(self.fake.count("DELETE", "/jobs/{ids}"), 1)
        self.assertEqual(self.fake.jobs[after.fts_jobid]["job_state"], "CANCELED")

    async def test_poll_cycle_survives_errors(self):
        """A cycle whose store fails logs the failure and fires normally, so the timer keeps running."""
        await self.start()

        def broken(*args, **kwargs):
            return defer.fail(RuntimeError("database on fire"))

        self.store.take_for_polling = broken
        self.assertEqual(await self.poller.poll_once(), {"jobs": 0, "requests": 0, "reported": 0})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_outages_never_end_a_transfer_before_its_timeout(self):
        """FTS down, or taking our token for anonymous, for most of transfer_timeout: the job stays TRANSFERRING, then times out."""
        await self.start(slow=["/prod=100000"])
        job = await self.staged()
        await self.pipeline.transfer(job.job_id)
        await self.server.stop_listening()
        for _ in range(10):
            self.clock.advance(170)
            await self.poller.poll_once()
        self.fake.tokens = {"other"}
        await self.server.start()
        for _ in range(10):
            self.clock.advance(170)
            await self.poller.poll_once()
        self.assertEqual((await self.job(job.job_id)).status, jobs.TRANSFERRING)  # 3400 s of the 3600
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}"), 1, "the refused token is not sent again")
        self.fake.tokens = {TOKEN, "other"}
        with open(self.token_file, "w") as handle:
            handle.write("other")
        self.clock.advance(100)
        await self.poller.poll_once()
        self.assertEqual((await self.job(job.job_id)).status, jobs.TRANSFERRING)
        self.clock.advance(200)
        await self.poller.poll_once()
        after = await self.job(job.job_id)
        self.assertEqual(after.status, jobs.ERROR)
        self.assertIn("transfer timed out after 3600s", after.detailed_status)

    async def test_fts_down_skips_the_cycle(self):
        """When FTS cannot be reached, the cycle reports nothing and the jobs stay TRANSFERRING."""
        await self.start(duration=0)
        job = await self.staged()
        await self.pipeline.transfer(job.job_id)
        await self.server.stop_listening()
        summary = await self.poller.poll_once()
        self.assertEqual((summary["reported"], (await self.job(job.job_id)).status), (0, jobs.TRANSFERRING))


class ConfigTests(unittest.TestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def config(self, **fts):
        overrides = {("transfer", "backend"): "fts", ("transfer", "allowed_schemes"): "gsiftp, davs, https",
                     ("stager", "archive_root"): self.base, ("stager", "staging_root"): self.base}
        overrides.update({("fts", key): value for key, value in fts.items()})
        return load_config(None, overrides)

    def token(self):
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as handle:
            handle.write("t")
        return token

    def test_from_config(self):
        """[transfer] backend = fts builds the FTS mover, whose schemes cover gsiftp, davs and https, and its poller."""
        mover = from_config(self.config(endpoint="https://fts.example.org:8446", auth="token", token_file=self.token(),
                                        poll_interval="5", bulk_size="50", priority="4"), reactor, reactor, None)
        self.addCleanup(mover.stopService)
        self.assertTrue(mover.asynchronous)
        self.assertEqual((mover.poll_interval, mover.bulk_size, mover.priority, mover.timeout), (5.0, 50, 4, 86400.0))
        self.assertEqual(mover.give_up_after, 86400.0)
        self.assertEqual(from_config(self.config(endpoint="https://f:8446", auth="token", token_file=self.token(),
                                                 give_up_after="7200"), reactor, reactor, None).give_up_after, 7200.0)
        self.assertLessEqual({"gsiftp", "davs", "https", "root", "srm", "s3"}, mover.schemes)
        (poller,) = mover.pollers(outcomes=None)
        self.assertIsInstance(poller, FTSPoller)
        self.assertEqual((poller.step, poller.bulk_size, poller.timeout), (5.0, 50, 86400.0))

    def test_configuration_mistakes(self):
        """Missing endpoint or token file, X.509 over http, a bad source template: start-up stops, naming the key."""
        token = self.token()
        cases = [
            ({}, "[fts] endpoint"),
            ({"endpoint": "https://f:8446", "auth": "token"}, "token_file"),
            ({"endpoint": "http://f:8446", "auth": "x509", "cert": token}, "https://"),
            ({"endpoint": "https://f:8446", "auth": "x509"}, "proxy, or cert and key"),
            ({"endpoint": "https://f:8446", "auth": "token", "token_file": token,
              "source_template": "gsiftp://{host}{path}"}, "source_template"),
            ({"endpoint": "https://f:8446", "auth": "x509", "proxy": "/no/such/proxy"}, "does not exist"),
        ]
        for fts, words in cases:
            with self.assertRaises(ConfigError) as caught:  # refused by the configuration, or else by from_config
                from_config(self.config(**fts), reactor, reactor, None)
            self.assertIn(words, str(caught.exception))

    def test_file_destinations_are_not_fts_business(self):
        """Allowing file:// with the FTS mover is refused at start: FTS cannot write local files."""
        with self.assertRaises(ConfigError) as caught:
            build(load_config(None, {("transfer", "backend"): "fts", ("fts", "endpoint"): "https://f:8446",
                                     ("fts", "auth"): "token", ("fts", "token_file"): self.token(),
                                     ("stager", "archive_root"): self.base, ("stager", "staging_root"): self.base}),
                  reactor)
        self.assertIn("allowed_schemes lists file", str(caught.exception))
