"""transferd.fleet in one in-process daemon (SQLite, memory queue): heartbeats, drain and undrain, the views."""

import dataclasses
import datetime

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.harness import Harness
from tests.support import settled, wait_for
from transferd import jobs
from transferd.fleet import DaemonInfo, Fleet, poll_shares, this_process


class FleetDaemonTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.harness = Harness(self.mktemp(), {("fleet", "heartbeat"): "0.2", ("fleet", "stale_after"): "1"})
        yield self.harness.start()
        self.addCleanup(self.harness.close)
        self.fleet = self.harness.daemon.fleet

    @defer.inlineCallbacks
    def submit(self):
        response, body = yield self.harness.request(
            "POST", "/submitTransfer", data={"product_id": "sample-001", "destination_path": self.harness.destination})
        self.assertEqual(response.code, 202, body)
        return (yield self.harness.store.list_jobs(jobs.JobFilter(), 1))[0].job_id

    @defer.inlineCallbacks
    def test_drained_daemon_takes_no_job_until_undrained(self):
        """Drained (SIGUSR2's request_drain), the daemon leaves a new job SUBMITTED; undrained, it delivers it."""
        yield self.fleet.request_drain(True)
        status = yield self.fleet.status()
        self.assertEqual([(view["state"], view["drain"], view["this"]) for view in status["daemons"]],
                         [("drained", True, True)])
        job_id = yield self.submit()
        yield task.deferLater(reactor, 0.5, lambda: None)  # two heartbeats: the flag stays as stored
        self.assertEqual((yield self.harness.store.get(job_id)).status, jobs.SUBMITTED)
        self.assertTrue(self.harness.daemon.reconciler.draining)
        self.assertTrue(all(poller.draining for poller in self.harness.daemon.pollers))
        views = yield self.fleet.set_drain(self.fleet.info.host, False)  # as PUT/DELETE .../drain do
        self.assertEqual([view["drain"] for view in views], [False])
        yield settled(self.harness.daemon)
        self.assertEqual((yield self.harness.store.get(job_id)).status, jobs.SUCCESS)
        self.assertEqual([view["state"] for view in (yield self.fleet.status())["daemons"]], ["running"])

    @defer.inlineCallbacks
    def test_flag_set_elsewhere_followed_on_the_next_beat(self):
        """A drain flag another daemon wrote in the table is followed within a heartbeat."""
        yield self.harness.store.set_drain([self.fleet.daemon_id], True)
        yield wait_for(lambda: self.fleet.draining, 5)
        self.assertEqual((yield self.fleet.set_drain("no-such-host", True)), [])

    @defer.inlineCallbacks
    def test_clean_stop_removes_the_row(self):
        """A daemon that stops cleanly deletes its row."""
        self.assertEqual(len((yield self.harness.store.fleet(0))), 1)
        yield self.fleet.stopService()
        self.assertEqual((yield self.harness.store.fleet(0)), [])


class ViewTests(unittest.TestCase):
    def test_states(self):
        """A daemon is stale past stale_after without a beat; drained ones are draining while they hold jobs."""
        clock = task.Clock()
        clock.advance(1_700_000_000)
        fleet = Fleet(store=None, clock=clock, info=this_process(clock), heartbeat=5, stale_after=30)
        now = clock.seconds()
        row = dataclasses.replace(fleet.info, time_beat=jobs.utc_from_seconds(now - 10))
        self.assertEqual(fleet.view(row, now, 0)["state"], "running")
        self.assertEqual(fleet.view(dataclasses.replace(row, drain=True), now, 2)["state"], "draining")
        self.assertEqual(fleet.view(dataclasses.replace(row, drain=True), now, 0)["state"], "drained")
        old = dataclasses.replace(row, time_beat=row.time_beat - datetime.timedelta(seconds=25))
        self.assertEqual(fleet.view(old, now, 3)["state"], "stale")
        self.assertEqual(fleet.view(row, now, 0)["time_beat"], "2023-11-14T22:13:10Z")


class PollSharesTests(unittest.TestCase):
    def row(self, daemon_id, beat_ago=1.0, drain=False):
        return DaemonInfo(daemon_id, "host", 1, "v", jobs.utc_from_seconds(0), drain, jobs.utc_from_seconds(100 - beat_ago))

    def test_live_daemons_share_the_slots_by_rank(self):
        """Live daemons, sorted by id, poll equal runs of slots that cover them all; stale and drained ones none."""
        rows = [self.row("c"), self.row("a"), self.row("b", beat_ago=31), self.row("d", drain=True), self.row("e")]
        shares = poll_shares(rows, 100, 30)
        self.assertEqual(shares, {"a": (0, 3, (0, 341)), "c": (1, 3, (341, 682)), "e": (2, 3, (682, 1024))})
        self.assertEqual(poll_shares([], 100, 30), {})

    @defer.inlineCallbacks
    def test_share_given_to_the_pollers_and_logged(self):
        """On its beat a daemon gives its pollers its share of the slots, and logs it when it changes."""
        harness = Harness(self.mktemp(), {("fleet", "heartbeat"): "0.2", ("fleet", "stale_after"): "1"})
        yield harness.start()
        self.addCleanup(harness.close)
        fleet = harness.daemon.fleet
        other = DaemonInfo("00000000-0000-4000-8000-000000000000", "elsewhere", 1, "v",
                           jobs.utc_from_seconds(reactor.seconds()))
        yield harness.store.beat(other)  # a daemon on another host, sorted first
        messages = []
        log_observer = lambda event: messages.append(event.get("log_format", ""))  # noqa: E731
        globalLogPublisher.addObserver(log_observer)
        self.addCleanup(globalLogPublisher.removeObserver, log_observer)
        yield fleet.beat()
        self.assertEqual(fleet.poll_share, (1, 2, (512, 1024)))
        self.assertTrue(all(poller.slots == (512, 1024) for poller in harness.daemon.pollers))
        self.assertTrue(any(message.startswith("polling share now") for message in messages), messages)
        status = yield fleet.status()
        shares = {view["daemon_id"]: view["poll_share"] for view in status["daemons"]}
        self.assertEqual(shares, {other.daemon_id: {"rank": 1, "of": 2, "slots": [0, 512]},
                                  fleet.daemon_id: {"rank": 2, "of": 2, "slots": [512, 1024]}})
        yield wait_for(lambda: fleet.poll_share == (0, 1, (0, 1024)), timeout=5)  # the other one went stale
