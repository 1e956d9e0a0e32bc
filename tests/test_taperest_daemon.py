"""End to end: the real `twistd -n transferd` with [stager] backend = taperest, against the fake Tape REST server.

The fake runs in the test process on real time; the daemon reaches it over
loopback HTTP.  Its tape paths are the files of the test's archive directory
(archive_root), so the local mover delivers them and the bytes are compared.
"""

import filecmp
import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial import unittest

from transferd import jobs, sample
from transferd.testing.taperest import FakeTapeRestServer
from tests.daemon import Daemon, daemon_config, free_port
from tests.support import wait_for


class TapeRestDaemonTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        self.deliveries = os.path.join(self.workdir, "deliveries")
        self.archive = os.path.join(self.workdir, "archive")
        os.makedirs(self.deliveries)
        sample.create(self.archive)
        for n in range(4):
            with open(os.path.join(self.archive, f"tape-{n}"), "wb") as handle:
                handle.write(os.urandom(1000 + n))
        self.fake = FakeTapeRestServer(reactor, recall_seconds=1.5, local_files=True, token="daemon-token")
        yield defer.Deferred.fromCoroutine(self.fake.start())
        self.addCleanup(self.fake.stop)
        token_file = os.path.join(self.workdir, "token")
        with open(token_file, "w") as handle:
            handle.write("daemon-token\n")
        port = free_port()
        config = daemon_config(self.workdir, port, stager={
            "backend": "taperest", "url": self.fake.url, "poll_interval": "0.3", "bulk_size": "5",
            "token_file": token_file, "retry_delay": "0.2",
        })
        self.daemon = Daemon(self.workdir, config, port)
        self.addCleanup(self.daemon.stop)
        yield self.daemon.start()

    def held_by_tape(self, job_ids):
        """Every job is STAGING with its request id stored and its worker's lease handed back (a stager hold)."""
        with sqlite3.connect(os.path.join(self.workdir, "jobs.sqlite")) as db:
            marks = ", ".join("?" for _ in job_ids)
            rows = db.execute(f"SELECT status, stager_request, lease_owner, lease_until FROM jobs "
                              f"WHERE job_id IN ({marks})", job_ids).fetchall()
        return len(rows) == len(job_ids) and all(
            status == jobs.STAGING and request and owner is None and until for status, request, owner, until in rows)

    @defer.inlineCallbacks
    def test_staged_from_tape_and_delivered_across_a_kill(self):
        """Jobs staged through Tape REST survive kill -9 mid-recall: after a restart they are polled to SUCCESS, posted once."""
        destination = "file://" + self.deliveries
        products = [f"tape-{n}" for n in range(4)] + ["sample-001"]
        job_ids = []
        for product in products:
            job_ids.append((yield self.daemon.submit(product, destination)))
        yield wait_for(lambda: self.held_by_tape(job_ids))
        posts = self.fake.calls["stage"]
        self.assertLessEqual(posts, 2)
        self.daemon.kill()
        yield self.daemon.start()
        views = yield self.daemon.wait_terminal(job_ids)
        for job_id, product in zip(job_ids, products):
            self.assertEqual(views[job_id]["status"], jobs.SUCCESS, views[job_id])
            self.assertTrue(filecmp.cmp(os.path.join(self.archive, product),
                                        os.path.join(self.deliveries, product), shallow=False))
        self.assertEqual(self.fake.calls["stage"], posts)
        self.assertEqual({seen.authorization for seen in self.fake.requests if seen.endpoint != "discovery"},
                         {"Bearer daemon-token"})
        yield wait_for(lambda: len(self.fake.released) == len(job_ids))

    @defer.inlineCallbacks
    def test_failed_recall_reported(self):
        """A file the tape system cannot recall ends its job in ERROR with the tape system's words."""
        self.fake.fail_path(os.path.join(self.archive, "tape-0"), "cartridge T0042 is damaged")
        job_id = yield self.daemon.submit("tape-0", "file://" + self.deliveries)
        views = yield self.daemon.wait_terminal([job_id])
        self.assertEqual(views[job_id]["status"], jobs.ERROR)
        self.assertIn("cartridge T0042 is damaged", views[job_id]["detailed_status"])
