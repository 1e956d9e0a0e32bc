"""End to end with every piece real: transferd on MariaDB + RabbitMQ, the reference stager, the fake FTS3.

Three processes on loopback, each on a free port:

* `twistd -n transferd-stager` (the reference stager) serving workdir/archive;
* `twistd -n transferd-fakefts --copy --token T`, which really copies files
  between the local paths of its URLs;
* `twistd -n transferd` on a fresh MariaDB database and a private RabbitMQ
  queue prefix, with [stager] backend = callback (the stager's /stage) and
  [transfer] backend = fts (the fake, token auth).

The stager reports a local path (workdir/stager-staging/<job>/<product>) on
host "stager.test"; [fts] source_template gsiftp://{staged_to}{path} makes
that gsiftp://stager.test/<path>, which the fake copies from by its path.
Destinations are gsiftp://localhost/<workdir>/deliveries/...; delivered bytes
are compared with the archive's.
"""

import filecmp
import os

import treq
from twisted.internet import defer
from twisted.trial import unittest

from transferd import jobs, sample
from tests import mysql_support
from tests.amqp_support import TestBroker, with_options
from tests.daemon import Daemon, daemon_config, free_port
from tests.support import wait_for
from tests.test_e2e_fts import TOKEN, FakeFTSProcess
from tests.test_e2e_staging import StagerDaemon, expected_files

STAGER_HOST = "stager.test"


class FullEndToEndTests(unittest.TestCase):
    timeout = 45  # a safety net: each test takes well under 20 s

    @defer.inlineCallbacks
    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        self.archive = os.path.join(self.workdir, "archive")
        self.deliveries = os.path.join(self.workdir, "deliveries")
        os.makedirs(self.deliveries)
        sample.create(self.archive)
        self.token_file = os.path.join(self.workdir, "fts-token")
        with open(self.token_file, "w") as handle:
            handle.write(TOKEN + "\n")
        # First, so that the database is dropped after the daemon has stopped (cleanups run last first).
        self.database_url = mysql_support.fresh_database(self)
        self.broker = TestBroker(self)
        yield self.broker.check()

    @defer.inlineCallbacks
    def start(self, stager_args=(), fake_args=(), stager=None):
        """Start the stager, the fake FTS and transferd, all at once; return (daemon, stager, fake)."""
        stager_process = StagerDaemon(self.workdir, free_port(), *stager_args)
        self.addCleanup(stager_process.stop)
        fake = FakeFTSProcess(self.workdir, free_port(), "--copy", *fake_args)
        self.addCleanup(fake.stop)
        stager_settings = {"backend": "callback", "url": stager_process.url + "/stage", "timeout": "10",
                           "retry_delay": "0.2", "max_attempts": "3"}
        stager_settings.update(stager or {})
        port = free_port()
        config = daemon_config(
            self.workdir, port,
            database={"url": self.database_url},
            queue={"url": with_options(self.broker.url, prefix=self.broker.prefix, retry_delay="0.2")},
            stager=stager_settings,
            transfer={"backend": "fts", "allowed_schemes": "gsiftp", "file_roots": self.deliveries},
            fts={"endpoint": fake.url, "auth": "token", "token_file": self.token_file,
                 "source_template": "gsiftp://{staged_to}{path}", "poll_interval": "0.2", "bulk_size": "20",
                 "transfer_timeout": "60"},
        )
        daemon = Daemon(self.workdir, config, port)
        self.addCleanup(daemon.stop)
        yield defer.gatherResults([stager_process.start(), fake.start(), daemon.start()], consumeErrors=True)
        return daemon, stager_process, fake

    def destination(self, name=""):
        return "gsiftp://localhost" + os.path.join(self.deliveries, name).rstrip("/")

    # -- checks -----------------------------------------------------------------

    def assertDelivered(self, product_id, under=""):
        """The archive's product and what arrived under deliveries/<under>/ are the same bytes."""
        source = os.path.join(self.archive, product_id)
        root = os.path.join(self.deliveries, under)
        target = os.path.join(root, product_id)
        if os.path.isdir(source):
            for directory, _, names in os.walk(source):
                for name in names:
                    path = os.path.join(directory, name)
                    delivered = os.path.join(target, os.path.relpath(path, source))
                    self.assertTrue(filecmp.cmp(path, delivered, shallow=False), delivered)
            self.assertEqual(expected_files(root, product_id), expected_files(self.archive, product_id))
        else:
            self.assertTrue(filecmp.cmp(source, target, shallow=False), target)

    @staticmethod
    def fts_jobs_for(state, job_id):
        return [job for job in state["jobs"] if job["sid"] == job_id]

    @defer.inlineCallbacks
    def fts_files(self, fake, fts_jobid):
        """GET /jobs/<id>/files on the fake, as an FTS client would (bearer token)."""
        response = yield treq.get(f"{fake.url}/jobs/{fts_jobid}/files", timeout=5, persistent=False,
                                  headers={"Authorization": f"Bearer {TOKEN}"})
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        return body

    def database_statuses(self):
        """{job_id: status} straight from the database."""
        rows = mysql_support.execute("SELECT job_id, status FROM jobs",
                                     database=mysql_support.database_name(self.database_url))
        return dict(rows)

    @defer.inlineCallbacks
    def statuses(self, daemon, job_ids):
        views = yield defer.gatherResults([daemon.status(job_id) for job_id in job_ids])
        return {view["job_id"]: view["status"] for view in views}

    # -- the tests ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_file_and_directory_products_delivered(self):
        """Staged by the stager and moved by FTS: both products SUCCESS, byte for byte, one FTS job each."""
        daemon, stager, fake = yield self.start(stager_args=("--delay", "0.2"), fake_args=("--duration", "0.2"))
        job_ids = {}
        for product in ("sample-001", "sample-002"):
            job_ids[product] = yield daemon.submit(product, self.destination())
        views = yield daemon.wait_terminal(list(job_ids.values()), timeout=15)
        state = yield fake.state()
        self.assertEqual(len(state["jobs"]), 2, state)
        self.assertEqual(state["requests"].get("POST /jobs"), 2, "one POST per product, never a second one")
        for product, job_id in job_ids.items():
            view = views[job_id]
            self.assertEqual(view["status"], jobs.SUCCESS, view)
            self.assertIn("FTS delivered", view["detailed_status"])
            self.assertDelivered(product)
            # What the stager reported.
            files = expected_files(self.archive, product)
            self.assertEqual((view["stage_attempts"], view["stager_hostname"]), (1, STAGER_HOST))
            staged_path = os.path.join(stager.staging, job_id, product)
            self.assertEqual(view.get("stager_path", staged_path), staged_path)  # shown until the copy is freed
            self.assertEqual(view["staged_files"], files)
            self.assertTrue(all(f["checksum"].startswith("adler32:") for f in files))
            # What FTS was given: one job, sid = our job id, one entry per staged file with size and checksum.
            [fts_job] = self.fts_jobs_for(state, job_id)
            self.assertEqual(state["submissions"][job_id], 1)
            self.assertEqual(view["fts_jobid"], fts_job["job_id"])
            self.assertEqual(fts_job["job_state"], "FINISHED")
            entries = yield self.fts_files(fake, view["fts_jobid"])
            self.assertEqual(len(entries), len(files), entries)
            by_path = {entry["file_metadata"]["path"]: entry for entry in entries}
            self.assertEqual(sorted(by_path), [f["path"] for f in files])
            for staged in files:
                entry = by_path[staged["path"]]
                self.assertEqual((entry["user_filesize"], entry["filesize"], entry["checksum"]),
                                 (staged["size"], staged["size"], staged["checksum"]), entry)
                self.assertEqual(entry["source_surl"],
                                 f"gsiftp://{STAGER_HOST}{os.path.dirname(staged_path)}/{staged['path']}")
                self.assertEqual(entry["dest_surl"], f"{self.destination()}/{staged['path']}")
                self.assertEqual(entry["file_state"], "FINISHED")
            # The job has ended: transferd told the stager (DELETE), which freed the staged copy.
            yield wait_for(lambda: not os.path.exists(os.path.join(stager.staging, job_id)), 10)

    @defer.inlineCallbacks
    def test_staging_failure_never_reaches_fts(self):
        """A product the stager fails ends in ERROR with the stager's words; FTS never hears of it."""
        daemon, stager, fake = yield self.start(stager_args=("--fail-products", "sample-002"),
                                                fake_args=("--duration", "0.2"))
        failed = yield daemon.submit("sample-002", self.destination())
        good = yield daemon.submit("sample-001", self.destination())
        views = yield daemon.wait_terminal([failed, good], timeout=15)
        self.assertEqual(views[good]["status"], jobs.SUCCESS, views[good])
        self.assertDelivered("sample-001")
        view = views[failed]
        self.assertEqual(view["status"], jobs.ERROR, view)
        self.assertEqual(view["detailed_status"],
                         "staging failed: staging of sample-002 failed: this stager was told to fail it "
                         "(--fail-products)")
        self.assertNotIn("fts_jobid", view)
        self.assertNotIn("time_transferring", view)
        state = yield fake.state()
        self.assertEqual(self.fts_jobs_for(state, failed), [])
        self.assertNotIn(failed, state["submissions"])
        self.assertEqual([job["sid"] for job in state["jobs"]], [good], "FTS saw the good job only")
        self.assertEqual(state["requests"].get("POST /jobs"), 1)
        self.assertFalse(os.path.exists(os.path.join(self.deliveries, "sample-002")))
        yield wait_for(lambda: f"job {failed}: transferd recorded the staging report" in stager.logs(), 10)

    @defer.inlineCallbacks
    def test_kill_9_mid_flight_then_restart(self):
        """transferd killed with jobs STAGING at the stager and TRANSFERRING at FTS: after a restart every
        job succeeds, each with exactly one FTS job (nothing submitted twice)."""
        daemon, stager, fake = yield self.start(
            stager_args=("--delay", "1", "--callback-retry", "0.2", "--callback-retry-max", "0.5"),
            fake_args=("--duration", "2"))
        products = ["sample-001", "sample-002"]
        # Batch one: let it reach FTS (TRANSFERRING; each FTS file takes 2 s).
        transferring = []
        for n in range(4):
            transferring.append((yield daemon.submit(products[n % 2], self.destination(f"t{n}"))))

        @defer.inlineCallbacks
        def all_in(job_ids, status):
            found = yield self.statuses(daemon, job_ids)
            return set(found.values()) == {status}

        yield wait_for(lambda: all_in(transferring, jobs.TRANSFERRING), 10, interval=0.05)
        # Batch two: let it reach the stager (STAGING; the recall takes 1 s).
        staging = []
        for n in range(4):
            staging.append((yield daemon.submit(products[n % 2], self.destination(f"s{n}"))))

        @defer.inlineCallbacks
        def at_the_stager(job_id):
            response = yield treq.get(f"{stager.url}/stage/{job_id}", timeout=2, persistent=False)
            yield response.content()
            return response.code == 200

        @defer.inlineCallbacks
        def all_at_the_stager():
            answers = yield defer.gatherResults([at_the_stager(job_id) for job_id in staging])
            return all(answers) and (yield all_in(staging, jobs.STAGING))

        yield wait_for(all_at_the_stager, 10, interval=0.05)
        daemon.kill()
        # What the database held when transferd died.
        at_kill = self.database_statuses()
        self.assertEqual({at_kill[job_id] for job_id in transferring}, {jobs.TRANSFERRING}, at_kill)
        self.assertEqual({at_kill[job_id] for job_id in staging}, {jobs.STAGING}, at_kill)

        yield daemon.start()
        job_ids = transferring + staging
        views = yield daemon.wait_terminal(job_ids, timeout=15)
        state = yield fake.state()
        for n, job_id in enumerate(transferring):
            self.assertEqual(views[job_id]["status"], jobs.SUCCESS, views[job_id])
            self.assertDelivered(products[n % 2], f"t{n}")
        for n, job_id in enumerate(staging):
            self.assertEqual(views[job_id]["status"], jobs.SUCCESS, views[job_id])
            self.assertEqual(views[job_id]["stage_attempts"], 1, "the stager's callback reached the new daemon")
            self.assertDelivered(products[n % 2], f"s{n}")
        for job_id in job_ids:
            fts_jobs = self.fts_jobs_for(state, job_id)
            self.assertEqual(len(fts_jobs), 1, (job_id, fts_jobs))
            self.assertEqual(state["submissions"][job_id], 1)
            self.assertEqual(views[job_id]["fts_jobid"], fts_jobs[0]["job_id"])
        self.assertEqual(len(state["jobs"]), len(job_ids), "no FTS job that is not one of ours")
        self.assertEqual(sum(state["submissions"].values()), len(job_ids))
        # The staging callbacks came while transferd was down, or after: either way the stager saw them recorded.
        yield wait_for(lambda: all(f"job {job_id}: transferd recorded the staging report" in stager.logs()
                                   for job_id in staging), 10)
