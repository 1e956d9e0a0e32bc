"""The fleet on real daemons: two twistd transferd sharing one MariaDB database and one RabbitMQ broker see
each other in GET /api/v1/daemons and `transferctl admin status`; a drained daemon (transferctl admin drain, or
SIGUSR2) takes no new jobs while the other takes them, and once stopped leaves nothing to re-drive.
"""

import json
import os
import signal
import subprocess
import sys

import treq
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests import mysql_support
from tests.amqp_support import TestBroker
from tests.daemon import Daemon, daemon_config, free_port
from tests.support import wait_for
from transferd import jobs, sample

TRANSFERCTL = os.path.join(os.path.dirname(sys.executable), "transferctl")


class FleetTestCase(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.workdir, "deliveries"))
        sample.create(os.path.join(self.workdir, "archive"))
        self.destination = "file://" + os.path.join(self.workdir, "deliveries")
        self.database_url = mysql_support.fresh_database(self)
        self.database = mysql_support.database_name(self.database_url)
        self.broker = TestBroker(self)
        yield self.broker.check()

    @defer.inlineCallbacks
    def start(self, name, delay="0"):
        port = free_port()
        path = daemon_config(self.workdir, port, database={"url": self.database_url},
                             queue={"url": self.broker.queue_url, "prefetch": "8"},
                             stager={"delay": delay}, fleet={"heartbeat": "0.3", "stale_after": "3"})
        daemon = Daemon(self.workdir, path, port, name=name)
        self.addCleanup(daemon.stop)
        yield daemon.start()
        return daemon

    @defer.inlineCallbacks
    def get(self, daemon, path):
        response = yield treq.get(daemon.url + path, timeout=10, persistent=False)
        answer = yield response.json()
        self.assertEqual(response.code, 200, answer)
        return answer

    @defer.inlineCallbacks
    def submit(self, daemon, count):
        self.submitted = getattr(self, "submitted", 0) + count
        response = yield treq.post(daemon.url + "/api/v1/jobs", json={"jobs": [
            {"product_id": "sample-001", "destination_path": f"{self.destination}/{n}"}  # one directory each
            for n in range(self.submitted - count, self.submitted)]}, timeout=10, persistent=False)
        answer = yield response.json()
        self.assertEqual((response.code, answer["accepted"]), (200, count), answer)
        return [result["job_id"] for result in answer["results"]]

    @defer.inlineCallbacks
    def fleet(self, daemon):
        """{daemon_id: view} as daemon's GET /api/v1/daemons shows the fleet, and the counts by state."""
        answer = yield self.get(daemon, "/api/v1/daemons")
        return {view["daemon_id"]: view for view in answer["daemons"]}, answer["jobs"]

    @defer.inlineCallbacks
    def own_id(self, daemon):
        views, _ = yield self.fleet(daemon)
        return next(daemon_id for daemon_id, view in views.items() if view["this"])

    @defer.inlineCallbacks
    def state_of(self, asked, daemon_id):
        views, _ = yield self.fleet(asked)
        return views[daemon_id]["state"] if daemon_id in views else None

    def transferctl(self, daemon, *args):
        """Run transferctl against daemon (in a thread: it blocks); (exit code, stdout, stderr)."""
        def run():
            done = subprocess.run([TRANSFERCTL, "admin", *args, "--url", daemon.url],
                                  capture_output=True, text=True, timeout=30)
            return done.returncode, done.stdout, done.stderr
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def workers_of(self, daemon, job_ids):
        """The daemons (ids) whose workers changed each job, from the jobs' histories."""
        found = set()
        for job_id in job_ids:
            view = yield self.get(daemon, f"/api/v1/jobs/{job_id}")
            self.assertEqual(view["status"], jobs.SUCCESS, view)
            found |= {event["actor"].rsplit("(daemon ", 1)[1].rstrip(")") for event in view["history"]
                      if "(daemon " in (event["actor"] or "")}
        return found

    @defer.inlineCallbacks
    def wait_success(self, daemon, job_ids, timeout=60):
        @defer.inlineCallbacks
        def done():
            views = yield defer.gatherResults([self.get(daemon, f"/api/v1/jobs/{job_id}") for job_id in job_ids])
            return all(view["status"] in jobs.TERMINAL for view in views)

        yield wait_for(done, timeout, interval=0.2)


class FleetTests(FleetTestCase):
    @defer.inlineCallbacks
    def test_see_each_other_drain_and_undrain(self):
        """Both daemons list both; drained with transferctl, one takes no new job while the other takes them all;
        undrained, it takes work again."""
        first = yield self.start("first")
        second = yield self.start("second")
        first_id = yield self.own_id(first)
        second_id = yield self.own_id(second)
        for daemon in (first, second):
            views, counts = yield self.fleet(daemon)
            self.assertEqual(set(views), {first_id, second_id})
            self.assertEqual({view["state"] for view in views.values()}, {"running"})
            self.assertEqual({view["pid"] for view in views.values()}, {first.process.pid, second.process.pid})
            self.assertEqual(counts[jobs.SUCCESS], 0)

        code, out, err = yield self.transferctl(first, "status")
        self.assertEqual(code, 0, err)
        self.assertIn(f"{first_id} *", out)
        self.assertIn(second_id, out)
        self.assertIn("0 SUCCESS", out)
        code, out, err = yield self.transferctl(first, "status", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual({view["daemon_id"] for view in json.loads(out)["daemons"]}, {first_id, second_id})

        code, out, err = yield self.transferctl(second, "drain", first_id)  # through the other daemon's API
        self.assertEqual(code, 0, err)
        self.assertIn(first_id, out)
        yield wait_for(lambda: first.logs().count("draining: taking no new work") == 1, 10)
        self.assertEqual((yield self.state_of(second, first_id)), "drained")

        job_ids = yield self.submit(first, 6)  # to the drained daemon's API: the other one does the work
        yield self.wait_success(first, job_ids)
        self.assertEqual((yield self.workers_of(first, job_ids)), {second_id})
        views, counts = yield self.fleet(first)
        self.assertEqual(counts[jobs.SUCCESS], 6)

        code, out, err = yield self.transferctl(first, "undrain", first_id)
        self.assertEqual(code, 0, err)
        self.assertEqual((yield self.state_of(first, first_id)), "running")
        code, out, err = yield self.transferctl(first, "drain", second_id)
        self.assertEqual(code, 0, err)
        yield wait_for(lambda: "draining: taking no new work" in second.logs(), 10)
        more = yield self.submit(second, 4)
        yield self.wait_success(second, more)
        self.assertEqual((yield self.workers_of(second, more)), {first_id})

        code, out, err = yield self.transferctl(first, "drain", "no-such-host")
        self.assertNotEqual(code, 0)
        self.assertIn("no daemon 'no-such-host'", err)
        self.assertNotIn("Traceback", err)

    @defer.inlineCallbacks
    def test_drained_daemon_stopped_leaves_nothing_to_redrive(self):
        """A daemon drained by SIGUSR2 while it stages jobs finishes them, shows drained, and once stopped
        holds no job and has no row; every job succeeds, each step done once, nothing re-driven."""
        first = yield self.start("first", delay="2")
        first_id = yield self.own_id(first)
        held = yield self.submit(first, 3)

        @defer.inlineCallbacks
        def holding():
            views, _ = yield self.fleet(first)
            return views[first_id]["jobs_held"] == 3

        yield wait_for(holding, 10)
        second = yield self.start("second", delay="0")
        second_id = yield self.own_id(second)
        first.process.send_signal(signal.SIGUSR2)
        yield wait_for(lambda: "draining: taking no new work" in first.logs(), 10)
        self.assertEqual((yield self.state_of(second, first_id)), "draining")  # it still holds its three
        later = yield self.submit(first, 3)

        @defer.inlineCallbacks
        def drained():
            return (yield self.state_of(second, first_id)) == "drained"

        yield wait_for(drained, 30, interval=0.2)
        first.stop()
        self.assertIn("Server Shut Down", first.logs())  # a clean stop (SIGTERM), not a kill
        owners = mysql_support.execute("SELECT COUNT(*) FROM jobs WHERE lease_owner = %s",
                                       (f"worker-{first_id}",), database=self.database)
        self.assertEqual(owners[0][0], 0)
        self.assertIsNone((yield self.state_of(second, first_id)))  # it removed its row when it stopped
        yield self.wait_success(second, held + later)
        self.assertEqual((yield self.workers_of(second, later)), {second_id})
        self.assertIn(first_id, (yield self.workers_of(second, held)))  # it staged the ones it held
        for job_id in held + later:
            view = yield self.get(second, f"/api/v1/jobs/{job_id}")
            moves = [(event["old_status"], event["new_status"]) for event in view["history"] if event["kind"] == "state"]
            self.assertEqual(len(moves), len(set(moves)), view["history"])  # no step done twice
        self.assertNotIn("reconciler re-drove", second.logs())
        self.assertNotIn("reconciler re-drove", first.logs())
