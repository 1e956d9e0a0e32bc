"""The FTS mover and its poller, with a real SQLite store and pipeline, against the fake FTS3 on loopback."""

import json
import math
import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from transferd import jobs
from transferd.config import ConfigError, load_config
from transferd.fts.client import FTSClient, FTSUnavailable, deterministic_job_id
from transferd.interfaces import IStager
from transferd.jobs import Job, StagedFile
from transferd.movers.fts import FTSMover, from_config
from transferd.pipeline import Pipeline
from transferd.queue.memory import MemoryJobQueue
from transferd.store.sqlite import SQLiteJobStore
from transferd.tap import build_mover
from transferd.testing.fakefts import FakeFTSServer, TestPKI
from tests.support import wait_for

TOKEN = "mover-token"
DESTINATION = "davs://dest.example.org:2880/deliveries"


@implementer(IStager)
class StubStager:
    timeout = 100.0
    max_attempts = 1

    def __init__(self):
        self.released = []

    def check(self, product_id):
        return defer.succeed(None)

    def stage(self, job, authcode):
        return defer.succeed(None)

    def cancel(self, job):
        return defer.succeed(None)

    def release(self, job):
        self.released.append(job.job_id)
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)


class MoverTestCase(unittest.TestCase):
    timeout = 60

    async def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.token_file = os.path.join(self.base, "token")
        with open(self.token_file, "w") as handle:
            handle.write(TOKEN)
        self.store = SQLiteJobStore.from_url("sqlite:///" + os.path.join(self.base, "jobs.sqlite"), reactor)
        await self.store.migrate()
        self.addCleanup(self.store.close)

    async def start(self, mover_clock=None, client_options=None, tls_options=None, **fake_options):
        fake_options.setdefault("token", TOKEN)
        self.server = FakeFTSServer(tls_options=tls_options, **fake_options)
        await self.server.start()
        self.addCleanup(self.server.stop)
        self.fake = self.server.fake
        options = {"auth": "token", "token_file": self.token_file, "request_timeout": 5}
        options.update(client_options or {})
        self.client = FTSClient(self.server.url, **options)
        self.addCleanup(self.client.close)
        self.mover = FTSMover(self.client, self.store, mover_clock or reactor, poll_interval=0.05, bulk_size=10,
                              transfer_timeout=3600)
        self.stager = StubStager()
        self.pipeline = Pipeline(self.store, MemoryJobQueue(reactor), self.stager, self.mover, reactor, lease=5)
        self.poller = self.mover.services(self.pipeline)[0].poller
        if self.client.auth == "token":
            await self.client.vo()  # learnt once: forced answers below then meet the call they mean

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

    async def poll_until_ended(self, job_ids, timeout=10):
        async def ended():
            await self.poller.poll_once()
            views = [await self.store.get(job_id) for job_id in job_ids]
            return all(view.terminal for view in views)

        await wait_for(lambda: defer.Deferred.fromCoroutine(ended()), timeout, interval=0.06)
        return {job_id: await self.store.get(job_id) for job_id in job_ids}


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
        await wait_for(lambda: self.fake.jobs_for_sid(job.job_id), 5)
        pending = await self.job(job.job_id)
        self.assertEqual(pending.status, jobs.STAGED)
        self.assertEqual(pending.fts_jobid, self.fake.jobs_for_sid(job.job_id)[0]["job_id"])
        await submitting
        done = await self.job(job.job_id)
        self.assertEqual((done.status, done.fts_jobid), (jobs.TRANSFERRING, pending.fts_jobid))
        self.assertEqual(done.fts_jobid, deterministic_job_id("transferd", job.job_id))
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
        """5xx or a dead FTS leave the job STAGED (to be tried again); once FTS is back it goes through."""
        await self.start()
        job = await self.staged()
        self.fake.respond_next(500)
        with self.assertRaises(FTSUnavailable) as caught:
            await self.mover.transfer(job)
        self.assertEqual(caught.exception.retry_later, self.mover.poll_interval)
        await self.server.stop_listening()
        try:
            await self.pipeline.transfer(job.job_id)
        except FTSUnavailable:
            pass  # the queue delivers the job again (or the pipeline holds it for retry_later)
        still = await self.job(job.job_id)
        self.assertEqual((still.status, still.lease_owner), (jobs.STAGED, None))
        await self.server.start()

        async def submitted():
            await self.pipeline.transfer(job.job_id)
            return (await self.job(job.job_id)).status == jobs.TRANSFERRING

        await wait_for(lambda: defer.Deferred.fromCoroutine(submitted()), 5, interval=0.06)
        self.assertEqual(len(self.fake.jobs), 1)

    async def test_transferring_jobs_are_never_posted_again(self):
        """A TRANSFERRING job handed to the mover again (a re-drive) is left to the poller: no POST."""
        await self.start(slow=["/prod=600"])
        job = await self.staged()
        await self.pipeline.transfer(job.job_id)
        self.assertIsNone(await self.mover.transfer(await self.job(job.job_id)))
        self.assertEqual(self.fake.count("POST", "/jobs"), 1)

    async def test_cancelled_while_submitting(self):
        """A job cancelled while its POST is pending has its FTS job cancelled once FTS answers."""
        await self.start(submit_delay=0.3, slow=["/prod=600"])
        job = await self.staged()
        submitting = defer.Deferred.fromCoroutine(self.pipeline.transfer(job.job_id))
        await wait_for(lambda: self.fake.jobs_for_sid(job.job_id), 5)
        await self.pipeline.cancel(job.job_id)
        await submitting
        self.assertEqual((await self.job(job.job_id)).status, jobs.CANCELLED)
        self.assertEqual(self.fake.jobs_for_sid(job.job_id)[0]["job_state"], "CANCELED")
        self.assertGreaterEqual(self.fake.count("DELETE", "/jobs/{ids}"), 1)

    async def test_vo_mismatch_records_ftss_id(self):
        """When FTS's id differs from the prediction (a wrong [fts] vo), FTS's id is recorded for polling."""
        await self.start(client_options={"vo": "not-the-fts-vo"})
        job = await self.staged()
        await self.pipeline.transfer(job.job_id)
        after = await self.job(job.job_id)
        self.assertEqual(after.fts_jobid, deterministic_job_id("transferd", job.job_id))

    async def test_x509_submission_delegates(self):
        """With X.509 the mover's first submission delegates a proxy to FTS, then submits."""
        pki = TestPKI.create(os.path.join(self.base, "pki"))
        await self.start(tls_options=pki.server_options(), auth="x509", token=None, client_options={
            "auth": "x509", "token_file": None, "cert": pki.user_cert, "key": pki.user_key, "ca_path": pki.ca})
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
        finished_id = deterministic_job_id("transferd", finished.job_id)
        await wait_for(lambda: self.fake.jobs[finished_id]["job_state"] == "FINISHED" and self.fake.lost, 5)
        before = self.fake.count("GET", "/jobs/{ids}")
        summary = await self.poller.poll_once()
        self.assertEqual(summary, {"jobs": 3, "requests": 1, "reported": 2})
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}") - before, 1)
        self.assertEqual((await self.job(finished.job_id)).status, jobs.SUCCESS)
        self.assertEqual((await self.job(running.job_id)).status, jobs.TRANSFERRING)
        self.assertIn("lost by FTS", (await self.job(lost.job_id)).detailed_status)

    async def test_bulk_polling_cost(self):
        """1000 TRANSFERRING jobs cost ceil(1000 / bulk_size) GET requests per cycle."""
        await self.start(slow=["/slow=600"])
        self.mover.bulk_size = 100
        self.mover.poll_interval = 30  # one cycle's claim lasts, so a second cycle finds nothing to poll
        semaphore = defer.DeferredSemaphore(32)
        ids = [jobs.new_job_id() for _ in range(1000)]

        def submit(sid):
            body = {"files": [{"sources": [f"gsiftp://s/slow/{sid}"], "destinations": [f"gsiftp://d/x/{sid}"]}],
                    "params": {"id_generator": "deterministic", "sid": sid}}
            return defer.Deferred.fromCoroutine(self.client.submit(body))

        await defer.gatherResults([semaphore.run(submit, sid) for sid in ids], consumeErrors=True)
        now = self.store._time_to_db(jobs.utc_from_seconds(reactor.seconds()))

        def insert(cursor):
            cursor.executemany(
                "INSERT INTO jobs (job_id, product_id, destination_path, status, fts_jobid, stage_attempts,"
                " time_submitted, time_transferring) VALUES (?, 'slow', ?, 'TRANSFERRING', ?, 1, ?, ?)",
                [(i, DESTINATION, deterministic_job_id("transferd", i), now, now) for i in ids])

        await self.store.pool.runInteraction(insert)
        before = self.fake.count("GET", "/jobs/{ids}")
        summary = await self.poller.poll_once()
        self.assertEqual(summary["jobs"], 1000)
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}") - before, math.ceil(1000 / 100))
        self.assertEqual(summary["reported"], 0)
        self.assertEqual((await self.poller.poll_once())["requests"], 0, "claimed for this cycle")

    async def test_timeout_cancels_then_errors(self):
        """A job still running past transfer_timeout is DELETEd at FTS, then ends in ERROR."""
        clock = task.Clock()
        await self.start(mover_clock=clock, slow=["/slow=600"])
        job = await self.staged("slow")
        await self.pipeline.transfer(job.job_id)
        clock.advance(reactor.seconds() + 10)
        self.assertEqual((await self.poller.poll_once())["reported"], 0, "not overdue yet")
        self.assertEqual(self.fake.count("DELETE", "/jobs/{ids}"), 0)
        clock.advance(3600)
        self.fake.respond_next(200, body=json.dumps([{"job_id": deterministic_job_id("transferd", job.job_id),
                                                      "job_state": "ACTIVE", "http_status": "200 Ok"}]).encode())
        self.fake.respond_next(503)  # the DELETE: FTS cannot be told, so the job waits for the next cycle
        clock.advance(1)
        await self.poller.poll_once()
        self.assertEqual((await self.job(job.job_id)).status, jobs.TRANSFERRING)
        await wait_for(lambda: defer.Deferred.fromCoroutine(self._ended(job.job_id)), 5)
        after = await self.job(job.job_id)
        self.assertEqual(after.status, jobs.ERROR)
        self.assertIn("transfer timed out after 3600s", after.detailed_status)
        self.assertEqual(self.fake.jobs[after.fts_jobid]["job_state"], "CANCELED")
        self.assertEqual(self.fake.count("DELETE", "/jobs/{ids}"), 2)

    async def _ended(self, job_id):
        await self.poller.poll_once()
        return (await self.job(job_id)).terminal

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

        self.store.claim_batch = broken
        self.assertEqual(await self.poller.poll_once(), {"jobs": 0, "requests": 0, "reported": 0})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_fts_down_skips_the_cycle(self):
        """When FTS cannot be reached, the cycle reports nothing and the jobs stay TRANSFERRING."""
        await self.start(duration=0)
        job = await self.staged()
        await self.pipeline.transfer(job.job_id)
        await self.server.stop_listening()
        summary = await self.poller.poll_once()
        self.assertEqual((summary["reported"], (await self.job(job.job_id)).status), (0, jobs.TRANSFERRING))


class ConfigTests(unittest.TestCase):
    def config(self, **fts):
        overrides = {("transfer", "backend"): "fts", ("transfer", "allowed_schemes"): "gsiftp, davs, https"}
        overrides.update({("fts", key): value for key, value in fts.items()})
        return load_config(None, overrides)

    def test_from_config(self):
        """[transfer] backend = fts builds the FTS mover, whose schemes cover gsiftp, davs and https."""
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as handle:
            handle.write("t")
        mover = build_mover(self.config(endpoint="https://fts.example.org:8446", auth="token", token_file=token,
                                        poll_interval="5", bulk_size="50", priority="4"), reactor, store=None)
        self.addCleanup(mover.close)
        self.assertTrue(mover.asynchronous)
        self.assertEqual((mover.poll_interval, mover.bulk_size, mover.priority, mover.timeout), (5.0, 50, 4, 86400.0))
        self.assertLessEqual({"gsiftp", "davs", "https", "root", "srm", "s3"}, mover.schemes)
        self.assertEqual(mover.services(pipeline=None)[0].step, 5.0)

    def test_configuration_mistakes(self):
        """Missing endpoint or token file, X.509 over http, a bad source template: start-up stops, naming the key."""
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as handle:
            handle.write("t")
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
            with self.assertRaises(ConfigError) as caught:
                from_config(self.config(**fts), reactor, None)
            self.assertIn(words, str(caught.exception))

    def test_file_destinations_are_not_fts_business(self):
        """Allowing file:// with the FTS mover is refused at start: FTS cannot write local files."""
        config = load_config(None, {("transfer", "backend"): "fts", ("fts", "endpoint"): "https://f:8446",
                                    ("fts", "auth"): "token", ("fts", "token_file"): "/t"})
        with self.assertRaises(ConfigError) as caught:
            build_mover(config, reactor, None)
        self.assertIn("file", str(caught.exception))

