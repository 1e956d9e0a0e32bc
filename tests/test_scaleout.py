"""Scale-out: three real daemons on one MariaDB database and one RabbitMQ broker, behind haproxy (issue 14).

Every request goes through a private haproxy configured from conf/haproxy.cfg
(tests/haproxy_support.py): the submissions, the reference stager's callbacks
(each daemon's [api] public_url is haproxy's) and every status question.
Staging is done by `twistd -n transferd-stager` and transfers by `twistd -n
transferd-fakefts --copy`, separate processes, so "each staged once and
transferred once" is counted outside the daemons: the stager's log lines per
job, the fake FTS's files per destination and submissions per job.

One daemon is killed with -9 while most jobs are in flight.  Every job must
end SUCCESS, haproxy must mark the dead daemon down and keep answering, and
the two survivors must divide the FTS polling between them: each shows its
share in GET /api/v1/daemons (poll_share) and logs it when it changes.
"""

import collections
import filecmp
import os
import re
import subprocess

import treq
from twisted.internet import defer
from twisted.trial import unittest

from transferd import jobs
from tests import mysql_support
from tests.amqp_support import TestBroker, with_options
from tests.daemon import Daemon, daemon_config, free_port
from tests.haproxy_support import HAPROXY, SAMPLE, HAProxy
from tests.support import wait_for
from tests.test_e2e_fts import TOKEN, FakeFTSProcess
from tests.test_e2e_staging import StagerDaemon

JOBS = 1000
BATCH = 100  # jobs per POST /api/v1/jobs
PRODUCTS = 10
SLOTS = 1024  # the polling is divided in slots of job ids; each live daemon polls a range of them
DAEMONS = ("d1", "d2", "d3")
SHARE_LOG = re.compile(r"polling share now slots (\d+)-(\d+) of 1024 \(rank (\d+) of (\d+) live daemons\)")


class ScaleOutTests(unittest.TestCase):
    timeout = 150  # a safety net: the run takes well under two minutes
    maxDiff = None

    @defer.inlineCallbacks
    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        self.archive = os.path.join(self.workdir, "archive")
        self.deliveries = os.path.join(self.workdir, "deliveries")
        os.makedirs(self.archive)
        os.makedirs(self.deliveries)
        for i in range(PRODUCTS):
            with open(os.path.join(self.archive, f"product-{i}"), "wb") as handle:
                handle.write(os.urandom(1024))
        self.token_file = os.path.join(self.workdir, "fts-token")
        with open(self.token_file, "w") as handle:
            handle.write(TOKEN + "\n")
        # First, so that the database is dropped after the daemons have stopped (cleanups run last first).
        self.database_url = mysql_support.fresh_database(self)
        self.broker = TestBroker(self)
        yield self.broker.check()

    @defer.inlineCallbacks
    def start_all(self):
        """The stager, the fake FTS, three daemons and haproxy in front of them."""
        self.stager = StagerDaemon(self.workdir, free_port(), "--delay", "0.2", "--callback-retry", "0.2")
        self.addCleanup(self.stager.stop)
        self.fake = FakeFTSProcess(self.workdir, free_port(), "--copy", "--duration", "0.5")
        self.addCleanup(self.fake.stop)
        yield defer.gatherResults([self.stager.start(), self.fake.start()], consumeErrors=True)
        ports = {name: free_port() for name in DAEMONS}
        self.haproxy = HAProxy(self, self.workdir, [(name, f"http://127.0.0.1:{port}") for name, port in ports.items()])
        self.daemons = {}
        for name, port in ports.items():
            config = daemon_config(
                self.workdir, port,
                api={"public_url": self.haproxy.url, "access_log": "false"},  # the stager calls back through haproxy
                database={"url": self.database_url},
                queue={"url": with_options(self.broker.url, prefix=self.broker.prefix, retry_delay="0.2"),
                       "prefetch": "16"},
                stager={"backend": "callback", "url": self.stager.url + "/stage", "timeout": "60",
                        "retry_delay": "0.2"},
                transfer={"backend": "fts", "allowed_schemes": "gsiftp", "file_roots": self.deliveries},
                fts={"endpoint": self.fake.url, "auth": "token", "token_file": self.token_file,
                     "source_template": "gsiftp://{staged_to}{path}", "poll_interval": "0.2", "bulk_size": "100",
                     "transfer_timeout": "120"},
                fleet={"heartbeat": "0.3", "stale_after": "3"},
            )
            daemon = self.daemons[name] = Daemon(self.workdir, config, port, name=name)
            self.addCleanup(daemon.stop)
        yield defer.gatherResults([daemon.start() for daemon in self.daemons.values()], consumeErrors=True)
        yield self.haproxy.start()
        yield wait_for(lambda: self.servers_are({name: "UP" for name in DAEMONS}), 10, interval=0.1)

    # -- through haproxy ------------------------------------------------------------

    @defer.inlineCallbacks
    def get(self, path):
        response = yield treq.get(self.haproxy.url + path, timeout=10, persistent=False)
        answer = yield response.json()
        self.assertEqual(response.code, 200, answer)
        return answer

    @defer.inlineCallbacks
    def submit(self, first, count):
        """count jobs in one POST /api/v1/jobs, job n to its own directory; {job_id: n}."""
        response = yield treq.post(self.haproxy.url + "/api/v1/jobs", json={"jobs": [
            {"product_id": f"product-{n % PRODUCTS}", "destination_path": self.destination(n)}
            for n in range(first, first + count)]}, timeout=30, persistent=False)
        answer = yield response.json()
        self.assertEqual((response.code, answer.get("accepted")), (200, count), answer)
        return {result["job_id"]: first + result["index"] for result in answer["results"]}

    def destination(self, n):
        return f"gsiftp://localhost{self.deliveries}/{n}"

    @defer.inlineCallbacks
    def fleet(self):
        """({daemon_id: view}, counts by state) as GET /api/v1/daemons shows them through haproxy."""
        answer = yield self.get("/api/v1/daemons")
        return {view["daemon_id"]: view for view in answer["daemons"]}, answer["jobs"]

    @defer.inlineCallbacks
    def servers_are(self, wanted):
        return (yield self.haproxy.servers()) == wanted

    @defer.inlineCallbacks
    def every_job(self):
        """{job_id: v1 view} of every job, page by page through haproxy."""
        views, cursor = {}, None
        while True:
            page = yield self.get("/api/v1/jobs?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
            views.update((view["job_id"], view) for view in page["jobs"])
            cursor = page["next"]
            if cursor is None:
                return views

    # -- the fleet's division of the polling -------------------------------------------

    def assertSharesCover(self, views, count):
        """The running daemons' poll_share: ranks 1..count, "of": count, and slot ranges [first, end),
        in rank order, that follow each other from 0 to 1024 (each daemon polls its own, together all)."""
        missing = [view["daemon_id"] for view in views if "poll_share" not in view]
        self.assertEqual(missing, [], "running daemons without a poll_share in GET /api/v1/daemons")
        shares = sorted((view["poll_share"] for view in views), key=lambda share: share["rank"])
        self.assertEqual([share["of"] for share in shares], [count] * count, shares)
        ranks = [share["rank"] for share in shares]
        self.assertEqual(ranks, list(range(1, count + 1)), shares)
        edges = [edge for share in shares for edge in share["slots"]]
        self.assertEqual(edges[0], 0, shares)
        self.assertEqual(edges[-1], SLOTS, shares)
        self.assertEqual(edges[1:-1:2], edges[2:-1:2], f"the slot ranges do not follow each other: {shares}")
        self.assertTrue(all(share["slots"][0] < share["slots"][1] for share in shares), shares)

    def assertShareLogged(self, daemon, share):
        """The daemon's last "polling share now" line (slots first-last, inclusive) says what its poll_share says."""
        lines = SHARE_LOG.findall(daemon.logs())
        self.assertTrue(lines, f"{daemon.name} never logged its polling share")
        first, last, rank, of = (int(value) for value in lines[-1])
        self.assertEqual({"rank": rank, "of": of, "slots": [first, last + 1]}, share, daemon.name)

    # -- the test ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_thousand_jobs_one_daemon_killed(self):
        """With 1,000 jobs through haproxy and one of three daemons killed -9 mid-run, every job succeeds, staged
        once and transferred once; haproxy marks the dead daemon down and keeps answering; the two survivors
        take the whole polling between them, and show and log their new shares."""
        yield self.start_all()
        ids_by_name = {}
        views, _ = yield self.fleet()
        for view in views.values():
            name = next(name for name, daemon in self.daemons.items() if daemon.process.pid == view["pid"])
            ids_by_name[name] = view["daemon_id"]
        self.assertEqual(set(ids_by_name), set(DAEMONS))

        job_ids = {}
        for first in range(0, JOBS, BATCH):
            job_ids.update((yield self.submit(first, BATCH)))
        self.assertEqual(len(job_ids), JOBS)

        @defer.inlineCallbacks
        def mid_run():
            views, counts = yield self.fleet()
            return (views, counts) if counts[jobs.SUCCESS] >= JOBS // 10 else None

        before, counts = yield wait_for(mid_run, 60, interval=0.1)
        in_flight = sum(counts[state] for state in jobs.ACTIVE)
        self.assertGreaterEqual(in_flight, JOBS // 2, f"too late for a kill mid-run: {counts}")
        # The one holding the most jobs now (its workers' leases) dies.
        victim_name = max(DAEMONS, key=lambda name: before[ids_by_name[name]]["jobs_held"])
        victim, victim_id = self.daemons[victim_name], ids_by_name[victim_name]
        survivors = [name for name in DAEMONS if name != victim_name]
        victim.kill()

        # haproxy sees it go (its /readyz checks fail) and routes around it meanwhile.
        yield wait_for(lambda: self.servers_are({name: "DOWN" if name == victim_name else "UP" for name in DAEMONS}),
                       10, interval=0.1)

        last = {}

        @defer.inlineCallbacks
        def all_ended():
            _, counts = yield self.fleet()
            last.update(counts)
            return sum(counts[state] for state in jobs.TERMINAL) == JOBS

        try:
            yield wait_for(all_ended, 90, interval=0.2)
        except AssertionError:
            self.fail(f"jobs still in flight 90 s after the kill: {last}")
        views = yield self.every_job()
        self.assertEqual(set(views), set(job_ids))
        failed = {job_id: view for job_id, view in views.items() if view["status"] != jobs.SUCCESS}
        self.assertEqual(failed, {}, f"{len(failed)} job(s) did not succeed")

        # Staged once: the stager was asked once for each job and staged it once.
        stager_log = self.stager.logs()
        for what in ("accepted staging of", "staged"):
            counted = collections.Counter(re.findall(rf"job ([0-9a-f-]{{36}}): {what} ", stager_log))
            self.assertEqual({job_id: counted[job_id] for job_id in job_ids if counted[job_id] != 1}, {},
                             f"the stager {what} these jobs more or less than once")
        # Transferred once: one FTS submission per job, one file per destination, each FINISHED and copied.
        state = yield self.fake.state()
        submissions = collections.Counter(job["sid"] for job in state["jobs"])
        self.assertEqual({job_id: submissions[job_id] for job_id in job_ids if submissions[job_id] != 1}, {},
                         "jobs submitted to FTS more or less than once")
        files = collections.Counter((entry["dest_surl"], entry["file_state"])
                                    for job in state["jobs"] for entry in job["files"])
        expected = collections.Counter({(self.destination(n) + f"/product-{n % PRODUCTS}", "FINISHED"): 1
                                        for n in job_ids.values()})
        self.assertEqual(files, expected)
        for n in job_ids.values():
            product = f"product-{n % PRODUCTS}"
            self.assertTrue(filecmp.cmp(os.path.join(self.archive, product),
                                        os.path.join(self.deliveries, str(n), product), shallow=False))
        for name, daemon in self.daemons.items():
            self.assertIn("SUBMITTED -> STAGING", daemon.logs(), f"{name} did no work")
        self.assertEqual(victim.process.returncode, -9)

        # haproxy still answers (everything above came through it), with the dead daemon still down.
        self.assertEqual((yield self.haproxy.servers()),
                         {name: "DOWN" if name == victim_name else "UP" for name in DAEMONS})
        self.assertEqual(set(re.findall(r"Server transferd/(\w+) is DOWN", self.haproxy.output())), {victim_name})

        # The fleet: the dead daemon is stale (or gone) and polls nothing; the two survivors share all 1024 slots.
        @defer.inlineCallbacks
        def victim_stale():
            views, _ = yield self.fleet()
            return views if views.get(victim_id, {"state": "stale"})["state"] == "stale" else None

        after = yield wait_for(victim_stale, 10, interval=0.2)
        self.assertEqual({ids_by_name[name] for name in survivors} | {victim_id}, set(after) | {victim_id})
        self.assertEqual({after[ids_by_name[name]]["state"] for name in survivors}, {"running"})
        self.assertSharesCover([before[ids_by_name[name]] for name in DAEMONS], 3)
        self.assertIsNone(after.get(victim_id, {}).get("poll_share"))

        @defer.inlineCallbacks
        def rebalanced():
            views, _ = yield self.fleet()
            shares = [views[ids_by_name[name]].get("poll_share") for name in survivors]
            return views if all(share and share["of"] == 2 for share in shares) else None

        after = yield wait_for(rebalanced, 10, interval=0.2)
        self.assertSharesCover([after[ids_by_name[name]] for name in survivors], 2)
        for name in survivors:
            self.assertShareLogged(self.daemons[name], after[ids_by_name[name]]["poll_share"])
            self.assertRegex(self.daemons[name].logs(), r"polling share now slots \d+-\d+ of 1024 \(rank \d+ of 3 ")


class SampleConfigTests(unittest.SynchronousTestCase):
    def test_sample_is_valid(self):
        """conf/haproxy.cfg as shipped (root's settings included) is a configuration haproxy accepts."""
        checked = subprocess.run([HAPROXY, "-c", "-f", SAMPLE], capture_output=True, text=True, timeout=30)
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
