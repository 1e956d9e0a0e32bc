"""The Tape REST stager in daemons built by transferd.wiring, against the fake Tape REST server over real HTTP.

Each "daemon" (Rig) is the whole transferd of a configuration: a real store,
an in-process queue, the pipeline, the Tape REST stager with its poller, and
the local mover.  Time (batch window, retries, polling, the fake's recalls,
leases) runs on one task.Clock that the tests advance; only the network and
the database run on the reactor.  The tape paths are real files under the
test's archive directory, so the local mover delivers them and the bytes are
compared.
"""

import collections
import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from transferd import jobs
from transferd.config import load_config, parse_database_url
from transferd.interfaces import ServiceAway
from transferd.pipeline import Reconciler
from transferd.stagers import taperest
from transferd.stagers.taperest import TapeRestStager
from transferd.store import open_store
from transferd.taperest.client import TapeRestClient
from transferd.testing.taperest import FakeTapeRestServer, TestPKI
from transferd.wiring import build
from tests import mysql_support
from tests.support import wait_for

POLL = 10.0  # seconds between polls, on the clock


class Rig:
    """One transferd instance (its API unused): store, queue, pipeline, Tape REST stager and poller, local mover.

    stager: [stager] settings over the rig's own; request_timeout, which has
    no configuration key, is set on the stager's HTTP client.
    """

    def __init__(self, store_url, url, namespace, deliveries, clock, request_timeout=None, **stager):
        self.clock = clock
        settings = dict(url=url, archive_root=namespace, bulk_size=20, poll_interval=POLL, timeout=100_000,
                        retry_delay=2.0, max_attempts=3)
        settings.update(stager)
        config = load_config(None, {
            ("api", "endpoint"): "tcp:0:interface=127.0.0.1", ("api", "access_log"): "false",
            ("database", "url"): store_url,
            ("queue", "max_deliveries"): "3",
            ("transfer", "file_roots"): deliveries,
            ("reconciler", "lease"): "30",
            ("stager", "backend"): "taperest",
            **{("stager", key): str(value) for key, value in settings.items()},
        })
        self.daemon = build(config, reactor, clock)
        self.store, self.pipeline, self.stager = self.daemon.store, self.daemon.pipeline, self.daemon.stager
        (self.poller,) = self.daemon.pollers
        if request_timeout is not None:
            self.stager.client.http.timeout = request_timeout
        self.submitted = 0  # jobs submitted through this rig
        self.stopped = False

    @defer.inlineCallbacks
    def start(self):
        self.daemon.startService()
        yield self.daemon.started
        yield wait_for(lambda: self.poller.polls >= 1)  # the poll made at start

    @defer.inlineCallbacks
    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        yield self.daemon.stopService()


class TapeRestTestBase(unittest.TestCase):
    timeout = 60
    fake_options: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.base = os.path.abspath(self.mktemp())
        self.archive = os.path.join(self.base, "archive")
        self.deliveries = os.path.join(self.base, "deliveries")
        os.makedirs(self.archive)
        os.makedirs(self.deliveries)
        self.store_url = "sqlite:///" + os.path.join(self.base, "jobs.sqlite")
        self.fake = yield self.start_fake(**self.fake_options)

    @defer.inlineCallbacks
    def start_fake(self, **options):
        options.setdefault("local_files", True)
        fake = FakeTapeRestServer(reactor, clock=self.clock, seed=7, **options)
        yield defer.Deferred.fromCoroutine(fake.start())
        self.addCleanup(fake.stop)
        return fake

    @defer.inlineCallbacks
    def rig(self, store_url=None, url=None, **options):
        rig = Rig(store_url or self.store_url, url or self.fake.url, self.archive, self.deliveries, self.clock,
                  **options)
        self.addCleanup(rig.stop)
        yield rig.start()
        return rig

    def products(self, count, prefix="p"):
        names = []
        for n in range(count):
            name = f"{prefix}-{n:03d}"
            with open(os.path.join(self.archive, name), "wb") as handle:
                handle.write(f"product {name}\n".encode() * (n + 1))
            names.append(name)
        return names

    def path(self, product_id):
        return os.path.join(self.archive, product_id)

    @defer.inlineCallbacks
    def submit(self, rig, products):
        ids = []
        for product_id in products:
            job = jobs.Job(job_id=jobs.new_job_id(), product_id=product_id,
                           destination_path="file://" + self.deliveries)
            yield rig.pipeline.submit(job)
            rig.submitted += 1
            ids.append(job.job_id)
        return ids

    @defer.inlineCallbacks
    def jobs_of(self, rig, ids):
        found = {}
        for job_id in ids:
            found[job_id] = yield rig.store.get(job_id)
        return found

    def statuses(self, rig, ids):
        return self.jobs_of(rig, ids).addCallback(lambda found: {i: j.status for i, j in found.items()})

    def all_in(self, rig, ids, *states):
        return self.statuses(rig, ids).addCallback(lambda s: all(v in states for v in s.values()))

    def all_waiting(self, rig, ids):
        """Every job waits for a stager that is away (its detailed_status says so)."""
        return self.jobs_of(rig, ids).addCallback(
            lambda found: all((j.detailed_status or "").startswith("waiting") for j in found.values()))

    def all_requested(self, rig, ids):
        return self.jobs_of(rig, ids).addCallback(lambda found: all(j.stager_request for j in found.values()))

    @defer.inlineCallbacks
    def send_batches(self, rig, ids):
        """Wait until the stager has every job submitted, close the batch window, wait for the request ids."""
        yield wait_for(lambda: rig.stager.accepted >= rig.submitted)
        self.clock.advance(0.2)
        yield wait_for(lambda: self.all_requested(rig, ids))

    def advance_until(self, predicate, step=POLL, timeout=20):
        """Advance the clock by step every few milliseconds until predicate() is true."""

        def tick():
            self.clock.advance(step)
            return defer.maybeDeferred(predicate)

        return wait_for(tick, timeout=timeout, interval=0.02)

    @defer.inlineCallbacks
    def cycle(self, *rigs):
        """One polling period: every rig's poller runs once, and finishes."""
        before = [rig.poller.polls for rig in rigs]
        self.clock.advance(POLL)
        yield wait_for(lambda: all(rig.poller.polls > n for rig, n in zip(rigs, before)))

    def status_gets(self):
        """GET /stage/<id> calls so far, per request id."""
        return collections.Counter(seen.path.rsplit("/", 1)[-1] for seen in self.fake.requests
                                   if seen.endpoint == "status")

    def retry_pending(self, low, high):
        """A call is scheduled between low and high seconds from now (the stager's retry)."""
        now = self.clock.seconds()
        return any(now + low <= call.getTime() <= now + high for call in self.clock.getDelayedCalls())

    def assertDelivered(self, product_id):
        with open(self.path(product_id), "rb") as source, \
                open(os.path.join(self.deliveries, product_id), "rb") as delivered:
            self.assertEqual(source.read(), delivered.read())


class BulkStagingTests(TapeRestTestBase):
    fake_options = {"recall_seconds": 30.0, "queue_seconds": 5.0}

    @defer.inlineCallbacks
    def test_fifty_jobs_in_three_posts_then_delivered_and_released(self):
        """50 jobs go out in ceil(50/20) = 3 POST /stage calls, are polled to SUCCESS, and their files released."""
        rig = yield self.rig()
        products = self.products(50)
        ids = yield self.submit(rig, products)
        yield wait_for(lambda: self.fake.calls["stage"] == 2 and rig.stager.queued == 10)
        self.clock.advance(0.2)  # the batch window ends: the last 10 go out together
        yield wait_for(lambda: self.all_requested(rig, ids))
        self.assertEqual(self.fake.calls["stage"], 3)
        self.assertEqual(sorted(len(r.files) for r in self.fake.stage_requests.values()), [10, 20, 20])
        found = yield self.jobs_of(rig, ids)
        for job in found.values():  # each job's request id is the one holding its file
            self.assertIn(self.path(job.product_id), self.fake.stage_requests[job.stager_request].files)

        yield self.cycle(rig)  # the recalls are still running
        self.assertEqual(set((yield self.statuses(rig, ids)).values()), {jobs.STAGING})
        self.assertEqual(sorted(self.status_gets().values()), [1, 1, 1])

        # A request's recalled files' jobs are recorded together, not one transition each.
        staged, many, one = [], rig.store.transition_many, rig.store.transition

        def transition_many(old, new, changes, actor=None):
            if (old, new) == (jobs.STAGING, jobs.STAGED):
                staged.append(len(changes))
            return many(old, new, changes, actor)

        def transition(job_id, old, new, *args, **kwargs):
            self.assertNotEqual((old, new), (jobs.STAGING, jobs.STAGED), "a job staged by a transition of its own")
            return one(job_id, old, new, *args, **kwargs)

        rig.store.transition_many, rig.store.transition = transition_many, transition
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS))
        self.assertEqual(sum(staged), 50)
        self.assertGreater(max(staged), 1, staged)
        for product_id in products:
            self.assertDelivered(product_id)
        found = yield self.jobs_of(rig, ids)
        job = found[ids[0]]
        self.assertEqual((job.stager_hostname, job.stager_path), ("127.0.0.1", self.path(products[0])))
        self.assertEqual(job.files(), (jobs.StagedFile(products[0]),))
        self.assertEqual(self.fake.calls["stage"], 3)
        self.assertEqual(self.fake.calls["discovery"], 1)  # discovered once, then cached
        yield wait_for(lambda: len(self.fake.released) == 50)
        self.assertEqual(sorted(self.fake.released),
                         sorted((j.stager_request, self.path(j.product_id)) for j in found.values()))

    @defer.inlineCallbacks
    def test_a_long_recall_is_asked_about_less_often(self):
        """A request is polled every poll_interval while its jobs are young in STAGING, then at an interval that
        doubles while under a tenth of their age, up to max_poll_interval (10 s, then 20 s from 200 s, 40 s from
        400 s)."""
        rig = yield self.rig(max_poll_interval=40)
        (product,) = self.products(1)
        self.fake.set_recall(self.path(product), 10**6)  # still on tape however long the test runs
        ids = yield self.submit(rig, [product])
        yield self.send_batches(rig, ids)
        entered = (yield self.jobs_of(rig, ids))[ids[0]].time_staging.timestamp()
        polled_at = []
        while self.clock.seconds() - entered < 590:
            before = sum(self.status_gets().values())
            yield self.cycle(rig)
            if sum(self.status_gets().values()) > before:
                polled_at.append(round(self.clock.seconds() - entered))
        self.assertEqual(polled_at, list(range(10, 200, 10)) + list(range(200, 400, 20)) + list(range(400, 600, 40)))
        self.assertEqual(set((yield self.statuses(rig, ids)).values()), {jobs.STAGING})

    @defer.inlineCallbacks
    def test_a_full_batch_is_followed_by_another(self):
        """With more jobs due than a batch takes (poll_limit), one cycle polls the requests of them all."""
        rig = yield self.rig()
        rig.poller.poll_limit = 20
        ids = yield self.submit(rig, self.products(50))
        yield wait_for(lambda: self.fake.calls["stage"] == 2 and rig.stager.queued == 10)
        self.clock.advance(0.2)
        yield wait_for(lambda: self.all_requested(rig, ids))
        yield self.cycle(rig)  # batches of 20, 20 and 10 jobs
        self.assertEqual(set(self.status_gets()), set(self.fake.stage_requests))
        self.assertEqual(set((yield self.statuses(rig, ids)).values()), {jobs.STAGING})

    @defer.inlineCallbacks
    def test_one_failing_file(self):
        """A file the tape system fails ends its job in ERROR with the tape system's error; the others succeed."""
        rig = yield self.rig()
        products = self.products(5)
        self.fake.fail_path(self.path(products[2]), "tape VOL042 is unreadable")
        ids = yield self.submit(rig, products)
        yield self.send_batches(rig, ids)
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS, jobs.ERROR))
        found = yield self.jobs_of(rig, ids)
        failed = found[ids[2]]
        self.assertEqual(failed.status, jobs.ERROR)
        self.assertIn("tape VOL042 is unreadable", failed.detailed_status)
        self.assertIn(self.path(products[2]), failed.detailed_status)
        self.assertEqual([j.status for i, j in found.items() if i != ids[2]], [jobs.SUCCESS] * 4)
        self.assertEqual(self.fake.calls["stage"], 1)

    @defer.inlineCallbacks
    def check_restart(self, store_url):
        rig = yield self.rig(store_url=store_url)
        products = self.products(10)
        ids = yield self.submit(rig, products)
        yield self.send_batches(rig, ids)
        yield self.cycle(rig)
        self.assertEqual(set((yield self.statuses(rig, ids)).values()), {jobs.STAGING})
        yield rig.stop()

        again = yield self.rig(store_url=store_url)
        # The jobs wait on the tape system: the reconciler leaves them alone (queue holds included).
        self.assertEqual((yield Reconciler(again.store, again.pipeline, queue_durable=False).run_once()), 0)
        yield self.advance_until(lambda: self.all_in(again, ids, jobs.SUCCESS))
        self.assertEqual(self.fake.calls["stage"], 1)
        for product_id in products:
            self.assertDelivered(product_id)

    def test_restart_resumes_polling_sqlite(self):
        """A new pipeline and stager over the same SQLite store poll the stored request ids to SUCCESS, posting nothing again."""
        return self.check_restart(self.store_url)

    def test_restart_resumes_polling_mariadb(self):
        """A new pipeline and stager over the same MariaDB database poll the stored request ids to SUCCESS, posting nothing again."""
        return self.check_restart(mysql_support.fresh_database(self))

    @defer.inlineCallbacks
    def test_same_product_twice_goes_in_two_requests(self):
        """Two jobs for one file are staged in different requests, so releasing one never unpins the other."""
        rig = yield self.rig()
        (product,) = self.products(1)
        ids = yield self.submit(rig, [product, product])
        yield self.send_batches(rig, ids)
        found = yield self.jobs_of(rig, ids)
        self.assertEqual(len({j.stager_request for j in found.values()}), 2)
        self.assertEqual(self.fake.calls["stage"], 2)


class SeveralPollersTests(TapeRestTestBase):
    fake_options = {"recall_seconds": 1000.0, "token": "s3cret"}

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.token_file = os.path.join(self.base, "token")
        with open(self.token_file, "w") as handle:
            handle.write("s3cret\n")

    @defer.inlineCallbacks
    def test_each_request_polled_once_per_cycle(self):
        """Two daemons polling the same jobs GET each staging request once per cycle between them, with the bearer token."""
        one = yield self.rig(bulk_size=5, token_file=self.token_file)
        two = yield self.rig(bulk_size=5, token_file=self.token_file)
        products = self.products(30)
        # Each daemon stages what it submitted: any daemon's scheduler releases the fleet's jobs, so one's is
        # drained while two's jobs are released.
        ids_one = yield self.submit(one, products[:15])
        yield wait_for(lambda: one.stager.accepted == 15)
        one.daemon.scheduler.drain()
        ids_two = yield self.submit(two, products[15:])
        yield wait_for(lambda: two.stager.accepted == 15)
        one.daemon.scheduler.undrain()
        self.clock.advance(0.2)  # nothing waits for the window: 15 is a multiple of bulk_size
        yield wait_for(lambda: self.all_requested(one, ids_one + ids_two))
        self.assertEqual(self.fake.calls["stage"], 6)
        for n in (1, 2, 3):
            yield self.cycle(one, two)
            self.assertEqual(self.status_gets(), {rid: n for rid in self.fake.stage_requests})
        self.assertEqual({seen.authorization for seen in self.fake.requests if seen.endpoint != "discovery"},
                         {"Bearer s3cret"})
        self.clock.advance(1000)
        ids = ids_one + ids_two
        yield self.advance_until(lambda: self.all_in(one, ids, jobs.SUCCESS))

    @defer.inlineCallbacks
    def test_cancel_sends_the_cancel_call(self):
        """Cancelling a staging job cancels its file on the tape system; the other jobs go on."""
        rig = yield self.rig(token_file=self.token_file)
        products = self.products(3)
        ids = yield self.submit(rig, products)
        yield self.send_batches(rig, ids)
        job = yield rig.store.get(ids[0])
        yield rig.pipeline.cancel(ids[0])
        yield wait_for(lambda: self.fake.cancelled)
        self.assertEqual(self.fake.cancelled, [(job.stager_request, self.path(products[0]))])
        self.assertEqual(self.fake.state_of(job.stager_request, self.path(products[0])), "CANCELLED")
        self.clock.advance(1000)
        yield self.advance_until(lambda: self.all_in(rig, ids[1:], jobs.SUCCESS))
        self.assertEqual((yield rig.store.get(ids[0])).status, jobs.CANCELLED)

    @defer.inlineCallbacks
    def test_cancel_before_the_post(self):
        """A job cancelled while it waits for the batch window never reaches the tape system."""
        rig = yield self.rig(token_file=self.token_file)
        (job_id,) = yield self.submit(rig, self.products(1))
        yield wait_for(lambda: rig.stager.queued == 1)
        yield rig.pipeline.cancel(job_id)
        self.assertEqual(rig.stager.queued, 0)
        self.clock.advance(1)
        self.assertEqual(self.fake.calls["stage"], 0)
        self.assertEqual((yield rig.store.get(job_id)).status, jobs.CANCELLED)

    @defer.inlineCallbacks
    def test_wrong_token_is_an_error_with_the_problem(self):
        """A 401 problem+json answer to POST /stage ends the job in ERROR with its title and detail."""
        with open(self.token_file, "w") as handle:
            handle.write("stale")
        rig = yield self.rig(token_file=self.token_file)
        (job_id,) = yield self.submit(rig, self.products(1))
        yield wait_for(lambda: rig.stager.queued == 1)
        self.clock.advance(0.2)
        yield wait_for(lambda: self.all_in(rig, [job_id], jobs.ERROR))
        job = yield rig.store.get(job_id)
        self.assertIn("HTTP 401", job.detailed_status)
        self.assertIn("Unauthorized: the bearer token is not valid", job.detailed_status)
        self.assertEqual(self.fake.calls["stage"], 1)  # not retried

    @defer.inlineCallbacks
    def test_token_file_read_again_when_it_changes(self):
        """A rewritten token file is used from the next request on."""
        rig = yield self.rig(token_file=self.token_file)
        first = yield self.submit(rig, self.products(1, "a"))
        yield self.send_batches(rig, first)
        os.replace(self._write(self.base, "new-token", "r0tated"), self.token_file)
        self.fake.tape.token = "r0tated"
        second = yield self.submit(rig, self.products(1, "b"))
        yield self.send_batches(rig, second)
        self.assertEqual(self.fake.requests[-1].authorization, "Bearer r0tated")

    @staticmethod
    def _write(directory, name, text):
        path = os.path.join(directory, name)
        with open(path, "w") as handle:
            handle.write(text)
        return path


class FailureTests(TapeRestTestBase):
    fake_options = {"recall_seconds": 5.0}

    @defer.inlineCallbacks
    def test_5xx_delays_the_jobs(self):
        """POST /stage answered 503 twice leaves the jobs STAGING, saying why; they are staged once it answers."""
        rig = yield self.rig()
        self.fake.respond_next(503, 2, endpoint="stage", title="Service Unavailable", detail="tape library busy")
        products = self.products(2)
        ids = yield self.submit(rig, products)
        yield wait_for(lambda: rig.stager.queued == 2)
        self.clock.advance(0.2)
        yield wait_for(lambda: self.fake.calls["stage"] == 1)
        yield wait_for(lambda: self.all_waiting(rig, ids))
        job = yield rig.store.get(ids[0])
        self.assertEqual(job.status, jobs.STAGING)
        self.assertIn("cannot be reached: HTTP 503: Service Unavailable: tape library busy", job.detailed_status)
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS), step=5)
        # The two refused POSTs, then each file in one accepted request: the retries share a batch or not,
        # as their timers and the batch window fall on the clock's 5 s steps.
        self.assertEqual(self.fake.calls["stage"] - len(self.fake.stage_requests), 2)
        self.assertEqual(sorted(path for r in self.fake.stage_requests.values() for path in r.files),
                         sorted(self.path(product) for product in products))

    @defer.inlineCallbacks
    def test_endpoint_away_for_ten_minutes(self):
        """With the default [stager] settings, an endpoint away for ten minutes only delays the jobs, however often they try."""
        port = self.fake.port_number
        yield self.fake.stop()
        rig = yield self.rig(url=f"http://127.0.0.1:{port}", retry_delay=2, timeout=3600, max_attempts=3)
        ids = yield self.submit(rig, self.products(3))
        yield wait_for(lambda: rig.stager.queued == 3)
        for _ in range(20):
            self.clock.advance(30)
            yield rig.pipeline.queue.idle()
        found = yield self.jobs_of(rig, ids)
        self.assertEqual({j.status for j in found.values()}, {jobs.STAGING})
        self.assertIn(f"the Tape REST endpoint http://127.0.0.1:{port} cannot be reached",
                      found[ids[0]].detailed_status)
        events = yield rig.store.events(ids[0])
        self.assertEqual(sum("cannot be reached" in (e["reason"] or "") for e in events), 1, "the outage's start")
        yield self.fake.start()
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS), step=30)
        for product_id in self.products(3):
            self.assertDelivered(product_id)

    @defer.inlineCallbacks
    def test_gives_up_after_give_up_after(self):
        """An endpoint away for longer than give_up_after fails the job, naming the outage."""
        port = self.fake.port_number
        yield self.fake.stop()
        rig = yield self.rig(url=f"http://127.0.0.1:{port}/api/v1", give_up_after=600)
        ids = yield self.submit(rig, self.products(1))
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.ERROR), step=30)
        job = yield rig.store.get(ids[0])
        self.assertIn(f"the Tape REST endpoint http://127.0.0.1:{port}/api/v1 cannot be reached", job.detailed_status)
        self.assertIn("gave up after", job.detailed_status)

    @defer.inlineCallbacks
    def test_endpoint_away_while_staging(self):
        """An endpoint gone while jobs are STAGING leaves them STAGING, polled in vain; they are staged once it is back."""
        rig = yield self.rig()
        ids = yield self.submit(rig, self.products(2))
        yield self.send_batches(rig, ids)
        yield self.fake.stop()
        for _ in range(5):
            yield self.cycle(rig)
        self.assertEqual(set((yield self.statuses(rig, ids)).values()), {jobs.STAGING})
        yield self.fake.start()
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS))
        self.assertEqual(self.fake.calls["stage"], 1)

    @defer.inlineCallbacks
    def test_timeout_then_retry(self):
        """A POST /stage that gets no answer within request_timeout is sent again."""
        rig = yield self.rig(request_timeout=0.3)
        self.fake.hang_next(1, endpoint="stage")
        ids = yield self.submit(rig, self.products(1))
        yield wait_for(lambda: rig.stager.queued == 1)
        yield self.advance_until(lambda: self.all_requested(rig, ids), step=0.5)
        self.assertEqual(self.fake.calls["stage"], 2)

    @defer.inlineCallbacks
    def test_refused_batch_is_split(self):
        """A batch refused with 400 is sent again file by file, so the good files still stage."""
        rig = yield self.rig()
        self.fake.respond_next(400, 1, endpoint="stage", title="Invalid request", detail="one path is bad")
        ids = yield self.submit(rig, self.products(3))
        yield self.send_batches(rig, ids)
        self.assertEqual(self.fake.calls["stage"], 4)
        found = yield self.jobs_of(rig, ids)
        self.assertEqual(len({j.stager_request for j in found.values()}), 3)

    @defer.inlineCallbacks
    def test_single_file_refused(self):
        """A single file refused with 400 ends its job in ERROR with the problem's title and detail."""
        rig = yield self.rig()
        self.fake.respond_next(400, 1, endpoint="stage", title="Invalid request", detail="path not allowed")
        ids = yield self.submit(rig, self.products(1))
        yield wait_for(lambda: rig.stager.queued == 1)
        self.clock.advance(0.2)
        yield wait_for(lambda: self.all_in(rig, ids, jobs.ERROR))
        job = yield rig.store.get(ids[0])
        self.assertIn("Invalid request: path not allowed", job.detailed_status)

    @defer.inlineCallbacks
    def test_lost_request(self):
        """A request the tape system no longer knows (404) ends its jobs in ERROR."""
        rig = yield self.rig()
        ids = yield self.submit(rig, self.products(2))
        yield self.send_batches(rig, ids)
        self.fake.forget((yield rig.store.get(ids[0])).stager_request)
        yield self.cycle(rig)
        yield wait_for(lambda: self.all_in(rig, ids, jobs.ERROR))
        job = yield rig.store.get(ids[0])
        self.assertIn("staging request lost by the tape system", job.detailed_status)

    @defer.inlineCallbacks
    def test_poll_5xx_waits_for_next_cycle(self):
        """A 5xx answer to GET /stage/<id>, or a proxy's HTML 404, leaves the jobs staging; the next cycle finishes them."""
        rig = yield self.rig()
        ids = yield self.submit(rig, self.products(2))
        yield self.send_batches(rig, ids)
        self.fake.respond_next(503, 1, endpoint="status")
        yield self.cycle(rig)
        self.fake.respond_next(404, 1, endpoint="status", title="Not Found", html=True)
        yield self.cycle(rig)
        self.assertEqual(set((yield self.statuses(rig, ids)).values()), {jobs.STAGING})
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS))

    @defer.inlineCallbacks
    def test_missing_file_fails(self):
        """A product the tape system does not have ends in ERROR with the tape system's reason."""
        rig = yield self.rig()
        ids = yield self.submit(rig, ["not-archived"])
        yield self.send_batches(rig, ids)
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.ERROR))
        job = yield rig.store.get(ids[0])
        self.assertIn("No such file or directory", job.detailed_status)


class DirectoryProductTests(TapeRestTestBase):
    """Products listed from a mount of the tape namespace (here the archive directory itself): several files each."""

    fake_options = {"recall_seconds": 30.0}

    def directory_product(self, name, files):
        """A directory product in the archive: {relative path: bytes}."""
        for relative, data in files.items():
            path = os.path.join(self.archive, name, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
        return name

    @defer.inlineCallbacks
    def test_a_directory_is_staged_in_one_request_and_delivered(self):
        """A directory product's files go in one request with another job's; it is STAGED only once all are on disk."""
        rig = yield self.rig(namespace_mount=self.archive)
        tree = self.directory_product("tree", {"a": b"a" * 3, "sub/b": b"b" * 5, "sub/deeper/c": b"c" * 7})
        (single,) = self.products(1)
        self.fake.set_recall(self.path("tree/sub/b"), 300.0)
        ids = yield self.submit(rig, [tree, single])
        yield self.send_batches(rig, ids)
        (request,) = self.fake.stage_requests.values()
        self.assertEqual(sorted(request.files), sorted([self.path("tree/a"), self.path("tree/sub/b"),
                                                        self.path("tree/sub/deeper/c"), self.path(single)]))
        yield self.advance_until(lambda: self.all_in(rig, ids[1:], jobs.SUCCESS))
        self.assertEqual((yield rig.store.get(ids[0])).status, jobs.STAGING, "one file is still on its way")
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS))
        job = yield rig.store.get(ids[0])
        self.assertEqual(job.stager_hostname, "127.0.0.1")
        self.assertEqual(job.files(), (jobs.StagedFile("tree/a", 3), jobs.StagedFile("tree/sub/b", 5),
                                       jobs.StagedFile("tree/sub/deeper/c", 7)))
        for relative in ("a", "sub/b", "sub/deeper/c"):
            self.assertDelivered(f"tree/{relative}")
        yield wait_for(lambda: len(self.fake.released) == 4)
        self.assertEqual(sorted(path for _, path in self.fake.released), sorted(request.files))

    @defer.inlineCallbacks
    def test_one_failing_file_fails_the_product(self):
        """One file of a directory product FAILED ends its job in ERROR naming it; its other pending file is cancelled."""
        rig = yield self.rig(namespace_mount=self.archive)
        tree = self.directory_product("tree", {"a": b"a", "b": b"b", "c": b"c"})
        self.fake.fail_path(self.path("tree/b"), "tape VOL007 is unreadable")
        self.fake.set_recall(self.path("tree/c"), 1000.0)
        ids = yield self.submit(rig, [tree])
        yield self.send_batches(rig, ids)
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.ERROR))
        job = yield rig.store.get(ids[0])
        self.assertIn(f"1 of 3 file(s) of {self.path('tree')} failed: {self.path('tree/b')} failed: "
                      "tape VOL007 is unreadable", job.detailed_status)
        yield wait_for(lambda: self.fake.cancelled)
        self.assertEqual(self.fake.cancelled, [(job.stager_request, self.path("tree/c"))])

    @defer.inlineCallbacks
    def test_a_product_not_in_the_namespace(self):
        """A product the mount does not show is refused at submission (check) and fails staging without a request."""
        rig = yield self.rig(namespace_mount=self.archive)
        self.assertEqual((yield rig.stager.check("nowhere")), False)
        self.assertEqual((yield rig.stager.check(self.products(1)[0])), True)
        ids = yield self.submit(rig, ["nowhere"])
        yield wait_for(lambda: self.all_in(rig, ids, jobs.ERROR))
        self.assertIn("product 'nowhere' is not in the archive", (yield rig.store.get(ids[0])).detailed_status)
        self.assertEqual(self.fake.calls["stage"], 0)

    @defer.inlineCallbacks
    def test_a_mount_that_is_not_there_is_an_outage(self):
        """A namespace mount that is not there keeps the job waiting; once it is mounted the job is staged."""
        mount = os.path.join(self.base, "mount")
        rig = yield self.rig(namespace_mount=mount)
        (product,) = self.products(1)
        ids = yield self.submit(rig, [product])
        yield wait_for(lambda: self.all_waiting(rig, ids))
        self.assertIn(f"the tape namespace mount {mount}", (yield rig.store.get(ids[0])).detailed_status)
        self.assertEqual((yield rig.stager.check(product)), None)
        os.symlink(self.archive, mount)
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS), step=5)


class EndpointTests(TapeRestTestBase):
    @defer.inlineCallbacks
    def test_endpoint_url_used_without_discovery(self):
        """A url with a path is the endpoint itself: no discovery document is fetched."""
        rig = yield self.rig(url=self.fake.endpoint_url)
        ids = yield self.submit(rig, self.products(2))
        yield self.send_batches(rig, ids)
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS))
        self.assertEqual(self.fake.calls["discovery"], 0)

    @defer.inlineCallbacks
    def test_on_disk_without_state(self):
        """A file described only by "onDisk": true counts as staged."""
        fake = yield self.start_fake(omit_state_on_disk=True)
        rig = yield self.rig(url=fake.url)
        ids = yield self.submit(rig, self.products(2))
        yield wait_for(lambda: rig.stager.queued == 2)
        self.clock.advance(0.2)
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS))


class StagerServiceTests(TapeRestTestBase):
    """The stager alone (no pipeline): stopping, and stage() calls cancelled as the daemon stops."""

    fake_options = {"recall_seconds": 5.0}

    @defer.inlineCallbacks
    def stager(self, **options):
        store = open_store(parse_database_url(self.store_url), reactor, self.clock)
        yield store.startService()
        self.addCleanup(store.stopService)
        stager = TapeRestStager(TapeRestClient(self.fake.url, self.archive, reactor, self.clock), store, self.clock,
                                **options)
        stager.startService()
        self.addCleanup(lambda: stager.running and stager.stopService())
        return stager

    @staticmethod
    def a_job(product_id="p"):
        return jobs.Job(job_id=jobs.new_job_id(), product_id=product_id, destination_path="file:///d")

    @defer.inlineCallbacks
    def test_stop_with_work_waiting(self):
        """Stopping the stager fails the stage() calls still waiting and leaves no timer behind."""
        stager = yield self.stager()
        pending = stager.stage(self.a_job(), "c")
        yield stager.stopService()
        with self.assertRaises(defer.CancelledError):
            yield pending
        self.assertEqual(self.clock.getDelayedCalls(), [])
        with self.assertRaises(defer.CancelledError):
            yield stager.stage(self.a_job(), "c")

    @defer.inlineCallbacks
    def test_cancelled_stage_call_leaves_the_batch(self):
        """A stage() Deferred cancelled while it waits for the batch window never reaches the tape system."""
        stager = yield self.stager()
        pending = [stager.stage(self.a_job(f"p-{n}"), "c") for n in range(2)]
        pending[0].cancel()
        self.assertFailure(pending[0], defer.CancelledError)
        self.assertEqual(stager.queued, 1)
        self.clock.advance(0.2)
        yield wait_for(lambda: self.fake.calls["stage"] == 1)
        (request,) = self.fake.stage_requests.values()
        self.assertEqual(list(request.files), [self.path("p-1")])

    @defer.inlineCallbacks
    def test_cancelled_batch_stops_its_post(self):
        """When every stage() of a batch whose POST is unanswered is cancelled, the POST is dropped and never sent again."""
        stager = yield self.stager()
        self.fake.hang_next(1, endpoint="stage")
        pending = [stager.stage(self.a_job(f"p-{n}"), "c") for n in range(2)]
        self.clock.advance(0.2)
        yield wait_for(lambda: self.fake.calls["stage"] == 1)
        for deferred in pending:
            deferred.cancel()
            self.assertFailure(deferred, defer.CancelledError)
        yield wait_for(lambda: not stager._busy)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(self.fake.calls["stage"], 1)

    @defer.inlineCallbacks
    def test_unreachable_is_service_away(self):
        """A POST /stage answered 503 fails the batch's stage() calls with ServiceAway after one try, retry_after being retry_delay."""
        stager = yield self.stager(retry_delay=7.0)
        self.fake.respond_next(503, 1, endpoint="stage")
        pending = [stager.stage(self.a_job(f"p-{n}"), "c") for n in range(2)]
        self.clock.advance(0.2)
        for deferred in pending:
            away = yield self.assertFailure(deferred, ServiceAway)
            self.assertEqual(away.retry_after, 7.0)
        self.assertEqual(self.fake.calls["stage"], 1)


class X509Tests(TapeRestTestBase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.pki = TestPKI(os.path.join(self.base, "pki"))
        self.tls_fake = yield self.start_fake(tls=self.pki, require_client_certificate=True)

    @defer.inlineCallbacks
    def check_stages_with(self, **tls):
        rig = yield self.rig(url=self.tls_fake.url, **tls)
        ids = yield self.submit(rig, self.products(2))
        yield wait_for(lambda: rig.stager.queued == 2)
        self.clock.advance(0.2)
        yield self.advance_until(lambda: self.all_in(rig, ids, jobs.SUCCESS))
        self.assertEqual({seen.client for seen in self.tls_fake.requests}, {"transferd test client"})

    def test_client_certificate_and_key(self):
        """Over HTTPS, the server is verified against ca_path and our certificate and key authenticate us."""
        return self.check_stages_with(ca_path=self.pki.ca_path, cert=self.pki.client_cert, key=self.pki.client_key)

    def test_proxy_file(self):
        """A proxy-style file (certificate and key in one) works as cert alone; a CA directory works as ca_path."""
        return self.check_stages_with(ca_path=os.path.dirname(self.pki.ca_path), cert=self.pki.client_proxy)

    def test_certificate_chain_sent(self):
        """The certificates after the first in cert (a proxy's issuer, an intermediate CA) are sent along."""
        return self.check_stages_with(ca_path=self.pki.ca_path, cert=self.pki.client_chain)

    @defer.inlineCallbacks
    def test_without_client_certificate(self):
        """A server that demands a client certificate we lack keeps the job waiting, saying it cannot be reached."""
        rig = yield self.rig(url=self.tls_fake.url, ca_path=self.pki.ca_path, max_attempts=1)
        ids = yield self.submit(rig, self.products(1))
        yield wait_for(lambda: rig.stager.queued == 1)
        self.clock.advance(0.2)
        yield wait_for(lambda: self.all_waiting(rig, ids))
        job = yield rig.store.get(ids[0])
        self.assertEqual(job.status, jobs.STAGING)
        self.assertIn("cannot be reached", job.detailed_status)


class ConfigTests(unittest.TestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.store = open_store(parse_database_url("sqlite:///" + os.path.join(self.base, "jobs.sqlite")), reactor, task.Clock())
        self.addCleanup(self.store.stopService)

    def build(self, **stager):
        values = {"backend": "taperest", "url": "https://tape.example.org:8443", "archive_root": "/pnfs/example/meerkat"}
        values.update(stager)
        config = load_config(None, {("stager", key): value for key, value in values.items()})
        stager = taperest.from_config(config, reactor, task.Clock(), self.store)
        self.addCleanup(stager.stopService)
        return stager

    def test_from_config(self):
        """backend = taperest builds the Tape REST stager with the [stager] settings; products are files under archive_root."""
        token = os.path.join(self.base, "token")
        with open(token, "w") as handle:
            handle.write("t")
        stager = self.build(bulk_size="7", poll_interval="5", timeout="900", max_attempts="4", retry_delay="1.5",
                            token_file=token, archive_root="/pnfs/example/meerkat/")
        self.assertIsInstance(stager, TapeRestStager)
        self.assertEqual((stager.bulk_size, stager.poll_interval, stager.timeout, stager.max_attempts,
                          stager.retry_delay), (7, 5.0, 900.0, 4, 1.5))
        self.assertEqual(stager.batch_size, 7)
        self.assertEqual(stager.client.path_for("prod-1"), "/pnfs/example/meerkat/prod-1")
        self.assertEqual((stager.give_up_after, stager.namespace), (86400.0, None))
        mounted = self.build(namespace_mount="/mnt/pnfs/meerkat", give_up_after="600")
        self.assertEqual((mounted.namespace.mount, mounted.give_up_after), ("/mnt/pnfs/meerkat", 600.0))

    def test_refusals(self):
        """A missing url, a relative archive_root or namespace_mount, a key without cert or a missing token file stop start-up."""
        from transferd.config import ConfigError

        for settings, words in (({"url": ""}, "url"), ({"archive_root": "transferd-data/archive"}, "archive_root"),
                                ({"key": "/k.pem"}, "key"), ({"token_file": "/no/such/token"}, "token_file"),
                                ({"ca_path": "/no/such/ca"}, "ca_path"),
                                ({"namespace_mount": "mnt/pnfs"}, "namespace_mount")):
            with self.assertRaises(ConfigError) as caught:
                self.build(**settings)
            self.assertIn(words, str(caught.exception))

    def test_tls_settings(self):
        """cert, key and ca_path load at start-up into the client TLS policy."""
        pki = TestPKI(os.path.join(self.base, "pki"))
        stager = self.build(cert=pki.client_cert, key=pki.client_key, ca_path=pki.ca_path)
        self.assertIsNotNone(stager.client.tls_policy.credential.load().tls_certificate)
