"""Fair share and limits on a running daemon (in process, SQLite, memory queue): submitter A queues 10,000
jobs, then B submits; with a slow stager and [limits] max_staging, B's jobs start within two scheduling
passes, and each share holds the staging slots its weight says.  With a destination host limited to 2
transfers, the mover never has more to it at once, while jobs to other hosts go on (docs/architecture.md,
"Scheduling")."""

import os

from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest
from zope.interface import implementer

from tests.support import wait_for
from tests.test_pipeline import ScriptedMover
from transferd import jobs
from transferd.auth.access import Identity
from transferd.config import load_config
from transferd.interfaces import IMover, IStager
from transferd.jobs import StageResult, TransferResult
from transferd.scheduler import STAGING, TRANSFER
from transferd.wiring import build

SLOTS = 8
STAGING_SECONDS = 0.04
TRANSFER_SECONDS = 0.05


@implementer(IStager)
class SlowStager(Service):
    """Stages every job in STAGING_SECONDS; records who holds how many slots, over time."""

    timeout = 3600.0
    max_attempts = 3
    give_up_after = 86400.0
    batch_size = 1

    def __init__(self):
        self.starts = []  # the share of each job, in the order staging started
        self.held = {}  # share -> jobs staging now
        self.most = 0  # the most staging at once
        self.slot_seconds = {}  # share -> seconds x slots held, since measuring began
        self.measuring = False
        self._last = None

    def _account(self):
        now = reactor.seconds()
        if self.measuring and self._last is not None:
            for share, count in self.held.items():
                self.slot_seconds[share] = self.slot_seconds.get(share, 0.0) + count * (now - self._last)
        self._last = now

    def measure(self, on):
        self._account()
        self.measuring = on

    def check(self, product_id):
        return defer.succeed(None)

    def stage(self, job, authcode):
        self._account()
        self.starts.append(job.share)
        self.held[job.share] = self.held.get(job.share, 0) + 1
        self.most = max(self.most, sum(self.held.values()))

        def finish():
            self._account()
            self.held[job.share] -= 1
            done.callback(StageResult(success=True, staged_to="host", path=f"/staged/{job.job_id}"))

        def cancelled(_):  # the daemon stops: no staging outlives it (trial checks the reactor is clean)
            later.cancel()
            self._account()
            self.held[job.share] -= 1

        done = defer.Deferred(cancelled)
        later = reactor.callLater(STAGING_SECONDS, finish)
        return done

    def still_staging(self, job):
        return defer.succeed(False)

    def cancel(self, job):
        return defer.succeed(None)

    def free_copy(self, job):
        return defer.succeed(None)

    def pollers(self, outcomes):
        return []


@implementer(IMover)
class SlowMover(Service):
    """Transfers in TRANSFER_SECONDS; records the most transfers at once per destination host."""

    schemes = frozenset({"https"})
    asynchronous = False
    timeout = None
    give_up_after = 3600.0

    def __init__(self):
        self.now = {}
        self.most = {}

    def transfer(self, job):
        host = job.destination_host
        self.now[host] = self.now.get(host, 0) + 1
        self.most[host] = max(self.most.get(host, 0), self.now[host])

        def finish():
            self.now[host] -= 1
            done.callback(TransferResult(success=True, msg="done"))

        def cancelled(_):
            later.cancel()
            self.now[host] -= 1

        done = defer.Deferred(cancelled)
        later = reactor.callLater(TRANSFER_SECONDS, finish)
        return done

    def cancel(self, job):
        return defer.succeed(None)

    def pollers(self, outcomes):
        return []


class FairnessTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def start(self, weights="", mover=None, settings=None):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        config = load_config(None, {
            ("api", "endpoint"): "tcp:0:interface=127.0.0.1",
            ("api", "access_log"): "false",
            ("database", "url"): "sqlite:///" + os.path.join(base, "jobs.sqlite"),
            ("stager", "archive_root"): base, ("stager", "staging_root"): base,
            ("queue", "prefetch"): "16",
            ("limits", "max_staging"): str(SLOTS),
            ("scheduler", "weights"): weights,
            **(settings or {}),
        })
        self.stager = SlowStager()
        self.daemon = build(config, reactor, stager=self.stager, mover=mover or ScriptedMover())
        self.daemon.startService()
        self.addCleanup(self.daemon.stopService)
        yield self.daemon.started

    @defer.inlineCallbacks
    def submit(self, share, count, destination="file:///d"):
        identity = Identity(share, "token")
        for start in range(0, count, 1000):
            batch = [jobs.Job(job_id=jobs.new_job_id(), product_id="p", destination_path=destination,
                              submitter=share) for _ in range(min(1000, count - start))]
            yield self.daemon.pipeline.submit_many(batch, share, identity=identity)

    def watch_releases(self):
        """A list that gets, for each staging pass from now on, the shares of the jobs it released; and in
        self.held, what each share held (released + staging) right after each pass that planned: the counts
        the pass read in its own transaction, plus what it released (a count read after the pass would miss
        a job that finished staging meanwhile)."""
        releasing, schedule = [], self.daemon.store.schedule
        self.held = []

        def watched(step, plan, *args, **kwargs):
            seen = []

            def planning(counts):
                seen.append(counts)
                return plan(counts)

            d = schedule(step, planning, *args, **kwargs)
            if step.name == "staging":
                d.addCallback(self._shares_of, releasing, seen)
            return d

        self.daemon.store.schedule = watched
        return releasing

    @defer.inlineCallbacks
    def _shares_of(self, ids, releasing, seen):
        found = yield defer.gatherResults([self.daemon.store.get(job_id) for job_id in ids])
        shares = [job.share for job in found]
        releasing.append(shares)
        if seen:
            counts = seen[-1]  # (the pass's last try, were it retried)
            held = {share: counts.released.get(share, 0) + counts.running.get(share, 0)
                    for share in set(counts.released) | set(counts.running) | set(shares)}
            for share in shares:
                held[share] += 1
            self.held.append(held)
        return ids

    @defer.inlineCallbacks
    def test_ten_jobs_after_ten_thousand_start_within_two_passes(self):
        """B's first job is released by the first or second staging pass that releases anything after B
        submits, and B comes to hold its half of the slots, no more."""
        yield self.start()
        yield self.submit("A", 10_000)
        yield wait_for(lambda: sum(self.stager.held.values()) == SLOTS and len(self.stager.starts) > 3 * SLOTS)
        releasing = self.watch_releases()
        yield self.submit("B", 10)
        yield wait_for(lambda: self.stager.starts.count("B") == 10, timeout=30)
        passes = [shares for shares in releasing if shares]
        self.assertIn("B", passes[0] + passes[1], f"B not released by the first two passes that released: {passes[:4]}")
        # B comes to hold its half of the slots, never more while A waits (ties go to A, by name).
        self.assertEqual(max(held.get("B", 0) for held in self.held), SLOTS // 2, self.held)
        self.assertLessEqual(self.stager.most, SLOTS)

    @defer.inlineCallbacks
    def test_each_share_holds_the_slots_its_weight_says(self):
        """A (weight 1) queues 10,000, then B (weight 3) 600: from B's jobs' commit until its last job is
        released, B holds 3/4 of the staging slots and A 1/4, each within 10% of that; never more than
        max_staging at once."""
        yield self.start(weights="3 B")
        yield self.submit("A", 10_000)
        yield wait_for(lambda: sum(self.stager.held.values()) == SLOTS)
        releasing = self.watch_releases()
        yield self.submit("B", 600)
        self.stager.measure(True)  # from the moment B's jobs are in the database
        yield wait_for(lambda: sum(shares.count("B") for shares in releasing) == 600, timeout=60, interval=0.005)
        self.stager.measure(False)
        total = sum(self.stager.slot_seconds.values())
        shares = {share: seconds / total for share, seconds in self.stager.slot_seconds.items()}
        self.assertLessEqual(abs(shares["B"] - 0.75), 0.075, shares)  # within 10% of its weight's share
        self.assertLessEqual(abs(shares["A"] - 0.25), 0.025, shares)
        self.assertLessEqual(self.stager.most, SLOTS)

    @defer.inlineCallbacks
    def test_destination_host_limit(self):
        """[limits] host_limits full.example.org 2: never more than 2 transfers to it at once, while the jobs to
        another host run 8 at a time; a job held back says so in its waiting_for; every job ends SUCCESS."""
        mover = SlowMover()
        yield self.start(mover=mover, settings={("limits", "host_limits"): "full.example.org 2",
                                                ("limits", "max_staging"): "unlimited"})
        yield self.submit("A", 30, destination="https://full.example.org/d")
        yield self.submit("A", 30, destination="https://other.example.org/d")
        store, why, deadline = self.daemon.store, None, reactor.seconds() + 30
        while why is None or why["reason"] != "limit_destination_host":  # (a job just staged is fair_share's)
            self.assertLess(reactor.seconds(), deadline, f"no job said it waits for the host's limit: {why}")
            held = yield store.list_jobs(jobs.JobFilter(statuses=(jobs.STAGED,), destination_host="full.example.org"),
                                         50)
            for job in held:
                answer = yield self.daemon.scheduler.why_waiting(job)
                if answer is not None:
                    why = answer[0]
                    break
            else:
                yield deferLater(reactor, 0.005, lambda: None)
        self.assertIn("at most 2 transfers to it at once", why["message"])
        yield wait_for(lambda: store.count_by_status().addCallback(lambda c: c == {jobs.SUCCESS: 60}), timeout=60)
        self.assertEqual(mover.most["full.example.org"], 2)
        self.assertGreater(mover.most["other.example.org"], 2)
        counts = yield store.scheduling_counts(TRANSFER, hosts=True)
        self.assertEqual(counts.hosts, {})
