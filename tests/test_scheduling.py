"""Fair share and limits (transferd.scheduler): the water-filling, and the store's part on SQLite and MariaDB."""

import types

from twisted.internet import defer, task
from twisted.trial import unittest

from tests.contract_scheduling import SchedulingContract
from tests.stores import OnMariaDB, OnSQLite
from transferd.auth.access import Identity
from transferd.scheduler import PASS_GAP, STEPS, Counts, Policy, Scheduler, allocate


class AllocateTests(unittest.TestCase):
    def test_equal_weights_fill_the_emptiest_first(self):
        counts = Counts(waiting={"A": 100, "B": 100}, released={}, running={"A": 6})
        self.assertEqual(allocate(8, counts, lambda share: 1.0), {"A": 1, "B": 7})

    def test_weights_share_in_proportion(self):
        counts = Counts(waiting={"A": 1000, "B": 1000}, released={}, running={})
        given = allocate(400, counts, {"A": 1.0, "B": 3.0}.get)
        self.assertEqual(given, {"A": 100, "B": 300})

    def test_demand_and_cap_bound_a_share(self):
        counts = Counts(waiting={"A": 2, "B": 100}, released={"B": 1}, running={})
        self.assertEqual(allocate(10, counts, lambda share: 1.0), {"A": 2, "B": 8})
        self.assertEqual(allocate(10, counts, lambda share: 1.0, cap=3), {"A": 2, "B": 2})

    def test_nothing_to_give(self):
        counts = Counts(waiting={"A": 5}, released={}, running={})
        self.assertEqual(allocate(0, counts, lambda share: 1.0), {})
        self.assertEqual(allocate(5, Counts({}, {}, {}), lambda share: 1.0), {})


class ShareTests(unittest.TestCase):
    def test_groups_by_identity_or_fqan_first_match_wins(self):
        policy = Policy(groups=(("production", "/meerkat/Role=production"), ("astro", "/meerkat"),
                                ("astro", "SUB=alice, ISS=https://iam.example.org")),
                        weights=((3.0, "production"),))
        producer = Identity("/DC=org/CN=Bot", "x509", ("/meerkat/Role=production/Capability=NULL",))
        member = Identity("/DC=org/CN=Bob", "x509", ("/meerkat",))
        self.assertEqual(policy.share_of(producer), "production")
        self.assertEqual(policy.share_of(member), "astro")
        self.assertEqual(policy.share_of(Identity("SUB=alice, ISS=https://iam.example.org", "token")), "astro")
        self.assertEqual(policy.share_of(Identity("/DC=org/CN=Carol", "x509")), "/DC=org/CN=Carol")
        self.assertEqual(policy.share_of(None), "anonymous")
        self.assertEqual((policy.weight("production"), policy.weight("astro")), (3.0, 1.0))


class SQLiteSchedulingTests(OnSQLite, SchedulingContract, unittest.TestCase):
    pass


class MariaDBSchedulingTests(OnMariaDB, SchedulingContract, unittest.TestCase):
    pass


class _SlowStore:
    """A store whose scheduling passes each take `took` seconds of clock time, releasing nothing; with waiting,
    each pass sees that many jobs waiting (all slots taken, as plan finds with queued_ahead 0)."""

    def __init__(self, clock, took, waiting=0):
        self.clock, self.took, self.waiting, self.starts = clock, took, waiting, []

    fold_batch = 10000

    def listen_for_events(self, listener):
        self.listener = listener

    def fold_job_counts(self):
        return defer.succeed(0)

    def schedule(self, step, planned, *args, **kwargs):
        self.starts.append(self.clock.seconds())
        if self.waiting:
            planned(Counts({"A": self.waiting}, {}, {}))
        return task.deferLater(self.clock, self.took, lambda: [])


class PassGapTests(unittest.TestCase):
    """Wake-ups share rounds of passes: PASS_GAP apart, or as far apart as a round takes when that is longer."""

    def rounds(self, took, waiting=0):
        clock = task.Clock()
        store = _SlowStore(clock, took, waiting)
        pipeline = types.SimpleNamespace(policy=Policy(), lease=30.0)
        scheduler = Scheduler(store, pipeline, clock, clock, interval=1000.0)
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        for _ in range(200):  # woken every 5 ms, as commits under load do
            scheduler.wake()
            clock.advance(0.005)
        return [store.starts[i] for i in range(0, len(store.starts), len(STEPS))]  # when each round began

    def test_quick_rounds_come_pass_gap_apart(self):
        starts = self.rounds(took=0.001)
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        self.assertGreater(len(starts), 20)
        # From one start to the next: the round (its passes end on the clock's next 5 ms steps), then PASS_GAP.
        self.assertGreaterEqual(min(gaps), PASS_GAP)
        self.assertLessEqual(max(gaps), PASS_GAP + 0.02)

    def test_arrivals_do_not_wake_a_blocked_staging_step(self):
        """While the staging step's last pass found jobs waiting and no slot free, commits that only bring new
        jobs run no pass (they free no slot); a job changing state does."""
        clock = task.Clock()
        store = _SlowStore(clock, 0.001, waiting=5)
        scheduler = Scheduler(store, types.SimpleNamespace(policy=Policy(), lease=30.0), clock, clock,
                              interval=1000.0)
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        clock.pump([0.005] * 20)  # the first round (at start), blocked
        rounds = len(store.starts)
        self.assertEqual(rounds, len(STEPS))
        for _ in range(50):
            store.listener(False)  # a submission's commit
            clock.advance(0.005)
        self.assertEqual(len(store.starts), rounds)
        store.listener(True)  # a job moved: a slot may be free
        clock.pump([0.005] * 20)
        self.assertEqual(len(store.starts), rounds + len(STEPS))

    def test_slow_rounds_leave_at_least_their_own_time_free(self):
        starts = self.rounds(took=0.05)  # a round (two passes) takes 0.1 s
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        self.assertGreater(len(starts), 3)
        self.assertGreaterEqual(min(gaps), 2 * 0.1 - 0.0001)  # the round, then as long again
