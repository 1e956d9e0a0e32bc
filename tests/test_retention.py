"""Housekeeping: ended jobs removed after [retention] keep (SQLite and MariaDB), and leftovers of a crash."""

import json
import os

from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.trial import unittest

from tests import mysql_support
from tests.contract_store import a_job
from tests.stores import OnMariaDB, OnSQLite
from tests.test_store_mysql import PROTOTYPE_SCHEMA
from tests.support import settled
from transferd import jobs
from transferd.config import load_config, parse_database_url
from transferd.retention import Housekeeping, Leftovers, Retention
from transferd.store.mysql import MySQLJobStore
from transferd.store.sqlite import SQLiteJobStore

DAY = 86400
KEEP = 180 * DAY


class RetentionContract:
    """Run against each store: make_store(clock) returns a migrated store."""

    async def setup_store(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.store = await self.make_store(self.clock)
        self.addCleanup(self.store.stopService)

    async def ended(self, status=jobs.SUCCESS, **fields):
        """A job that went from SUBMITTED to status now, through every state (SUCCESS) or from STAGING."""
        job = a_job(**fields)
        await self.store.create(job)
        path = (jobs.STAGING, jobs.STAGED, jobs.TRANSFERRING) if status == jobs.SUCCESS else (jobs.STAGING,)
        old = jobs.SUBMITTED
        for new in path + (status,):
            extra = {"detailed_status": "failed"} if new == jobs.ERROR else {}
            await self.store.transition(job.job_id, old, new, extra)
            old = new
        return job.job_id

    async def active(self):
        job = a_job()
        await self.store.create(job)
        return job.job_id

    async def present(self, job_ids):
        return {job_id for job_id in job_ids if await self.store.get(job_id) is not None}

    async def test_events_purged_with_their_job_once_delivered(self):
        """An old ended job with an event delivery still pending stays; once it is delivered the job goes, and its
        outbox and delivery rows with it."""
        from transferd.store.outbox import DELIVERED, Outbox, Outcome

        await self.setup_store()
        job_id = await self.ended()
        outbox = Outbox(self.store)
        await outbox.fan_out(lambda state, notify_url: ["amqp"] if state == jobs.SUCCESS else [])
        self.clock.advance(KEEP + DAY)
        retention = Retention(self.store, self.clock, KEEP, batch=10, pause=0)
        self.assertEqual(await retention.run_once(), (0, 0))
        claimed = await outbox.claim("test", 60)
        self.assertEqual([delivery.job_id for delivery in claimed], [job_id])
        await outbox.record("test", [Outcome(claimed[0].delivery_id, DELIVERED)])
        self.assertEqual(await retention.run_once(), (1, 0))

        def rows(cursor):
            counts = []
            for table in ("outbox", "event_deliveries"):
                cursor.execute(f"SELECT COUNT(*) FROM {table}")
                counts.append(int(cursor.fetchone()[0]))
            return counts

        self.assertEqual(await self.store._run(rows), [0, 0])

    async def test_old_ended_jobs_removed_with_their_history(self):
        """When ended jobs have not changed for keep, they and their events go; active and recent ones stay."""
        await self.setup_store()
        old = [await self.ended(status) for status in (jobs.SUCCESS, jobs.ERROR, jobs.CANCELLED)]
        old_active = await self.active()
        self.clock.advance(KEEP - DAY)
        recent = await self.ended()
        self.clock.advance(2 * DAY)
        archive = os.path.abspath(self.mktemp())
        retention = Retention(self.store, self.clock, KEEP, archive=archive, batch=2, pause=0)
        self.assertEqual(await retention.run_once(), (3, 0))
        self.assertEqual(await self.present(old + [old_active, recent]), {old_active, recent})
        self.assertEqual(await self.store.events(old[0]), [])
        with open(archive) as handle:
            lines = [json.loads(line) for line in handle]
        self.assertEqual(sorted(line["job_id"] for line in lines), sorted(old))
        for line in lines:
            self.assertEqual(line["events"][-1]["new_status"], line["status"])
            self.assertEqual(line["events"][-2]["new_status"], jobs.STAGING if line["status"] != jobs.SUCCESS
                             else jobs.TRANSFERRING)
        self.assertNotIn("stager_callback", lines[0])

    async def test_batches_are_bounded(self):
        """When more jobs are due than a batch holds, each transaction removes at most a batch."""
        await self.setup_store()
        due = [await self.ended() for _ in range(5)]
        self.clock.advance(KEEP + DAY)
        before = jobs.utc_from_seconds(self.clock.seconds() - KEEP)
        self.assertEqual(await self.store.purge_ended(before, 2), 2)
        self.assertEqual(len(await self.present(due)), 3)
        self.assertEqual(await Retention(self.store, self.clock, KEEP, batch=2, pause=0).run_once(), (3, 0))
        self.assertEqual(await self.present(due), set())

    async def test_pause_between_batches(self):
        """When a pass needs several batches, it waits `pause` on the clock between them."""
        await self.setup_store()
        due = [await self.ended() for _ in range(3)]
        self.clock.advance(KEEP + DAY)
        running = defer.Deferred.fromCoroutine(Retention(self.store, self.clock, KEEP, batch=2, pause=5).run_once())
        while len(await self.present(due)) != 1:
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(running.called)
        self.clock.advance(5)
        self.assertEqual(await running, (3, 0))

    async def test_archive_reopened_after_rotation(self):
        """When the archive file is renamed away (rotation), the next batch starts a new file."""
        await self.setup_store()
        first = await self.ended()
        self.clock.advance(KEEP + DAY)
        archive = os.path.abspath(self.mktemp())
        retention = Retention(self.store, self.clock, KEEP, archive=archive, pause=0)
        await retention.run_once()
        os.rename(archive, archive + ".1")
        second = await self.ended()
        self.clock.advance(KEEP + DAY)
        await retention.run_once()
        for path, job_id in ((archive + ".1", first), (archive, second)):
            with open(path) as handle:
                self.assertEqual([json.loads(line)["job_id"] for line in handle], [job_id])

    async def test_archive_failure_keeps_the_rows(self):
        """When the archive cannot be written, nothing is removed."""
        await self.setup_store()
        job_id = await self.ended()
        self.clock.advance(KEEP + DAY)
        archive = os.path.join(os.path.abspath(self.mktemp()), "missing-dir", "archive.jsonl")
        retention = Retention(self.store, self.clock, KEEP, archive=archive, pause=0)
        await self.assertFailure(defer.Deferred.fromCoroutine(retention.run_once()), OSError)
        self.assertEqual(await self.present([job_id]), {job_id})

    async def test_old_submissions_removed(self):
        """When a batch submission is older than keep, its submissions row goes too; a recent one stays."""
        await self.setup_store()
        await self.store.create_many([a_job()], submission=jobs.Submission("alice", "old", {"ok": 1}))
        self.clock.advance(KEEP + DAY)
        await self.store.create_many([a_job()], submission=jobs.Submission("alice", "new", {"ok": 2}))
        retention = Retention(self.store, self.clock, KEEP, pause=0)
        self.assertEqual((await retention.run_once())[1], 1)
        self.assertIsNone(await self.store.submission("alice", "old"))
        self.assertIsNotNone(await self.store.submission("alice", "new"))

    async def test_copy_freed_only_for_ended_jobs(self):
        """When the copy of an ended job is gone, its stager_path is no longer shown; an active job's still is."""
        await self.setup_store()
        ended = await self.ended()
        await self.store.update(ended, jobs.SUCCESS, {"stager_path": "/staging/x"})
        active = await self.active()
        await self.store.update(active, jobs.SUBMITTED, {"stager_path": "/staging/y"})
        self.assertEqual(await self.store.copies_freed([ended]), 1)
        self.assertEqual(await self.store.copies_freed([ended]), 0)  # once
        self.assertEqual(await self.store.copies_freed([active]), 0)
        freed = await self.store.get(ended)
        self.assertEqual(freed.time_copy_freed, jobs.utc_from_seconds(self.clock.seconds()))
        self.assertNotIn("stager_path", freed.public_view())
        self.assertNotIn("stager_path", freed.public_view(v1=True))
        self.assertEqual((await self.store.get(active)).public_view()["stager_path"], "/staging/y")


class SQLiteRetentionTests(OnSQLite, RetentionContract, unittest.TestCase):
    pass


class MySQLRetentionTests(OnMariaDB, RetentionContract, unittest.TestCase):
    async def test_concurrent_passes_take_different_rows(self):
        """When two daemons purge at once, every due job is removed once and archived once."""
        await self.setup_store()
        due = [await self.ended() for _ in range(40)]
        self.clock.advance(KEEP + DAY)
        other = MySQLJobStore.from_url(parse_database_url(self.url), reactor, self.clock)
        self.addCleanup(other.stopService)
        archives = [os.path.abspath(self.mktemp()) for _ in range(2)]
        passes = [Retention(store, self.clock, KEEP, archive=path, batch=5, pause=0)
                  for store, path in zip((self.store, other), archives)]
        results = await defer.gatherResults([defer.Deferred.fromCoroutine(p.run_once()) for p in passes])
        self.assertEqual(sum(removed for removed, _ in results), 40)
        archived = []
        for path in archives:
            if os.path.exists(path):
                with open(path) as handle:
                    archived += [json.loads(line)["job_id"] for line in handle]
        self.assertEqual(sorted(archived), sorted(due))
        self.assertEqual(await self.present(due), set())

    async def test_prototype_rows_removed(self):
        """When a prototype database is upgraded, its old ended rows (time_updated backfilled) are removed too."""
        self.url = mysql_support.fresh_database(self, charset="latin1")
        database = mysql_support.database_name(self.url)
        with open(PROTOTYPE_SCHEMA) as schema:
            mysql_support.execute(schema.read(), database=database)
        old_id, running_id = jobs.new_job_id(), jobs.new_job_id()
        mysql_support.execute(
            "INSERT INTO jobs (job_id, product_id, status, destination_path, time_submitted, time_success)"
            " VALUES (%s, 'p', 'SUCCESS', 'davs://se.example.org/x', '2023-05-02 14:00:00', '2023-05-02 15:00:00'),"
            " (%s, 'p', 'TRANSFERRING', 'davs://se.example.org/x', '2023-05-02 14:00:00', NULL)",
            (old_id, running_id), database=database)
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)  # 2027: the prototype's rows are years old
        self.store = MySQLJobStore.from_url(parse_database_url(self.url), reactor, self.clock)
        self.addCleanup(self.store.stopService)
        await self.store.migrate()
        self.assertEqual(await Retention(self.store, self.clock, KEEP, pause=0).run_once(), (1, 0))
        self.assertEqual(await self.present([old_id, running_id]), {running_id})


class LeftoversTests(unittest.TestCase):
    async def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        path = os.path.abspath(self.mktemp() + ".sqlite")
        self.store = SQLiteJobStore.from_url(parse_database_url("sqlite:///" + path), reactor, self.clock)
        await self.store.migrate()
        self.addCleanup(self.store.stopService)
        self.staging = os.path.abspath(self.mktemp())
        self.deliveries = os.path.abspath(self.mktemp())
        os.makedirs(self.staging)
        os.makedirs(os.path.join(self.deliveries, "out"))
        self.events = []

    def leftovers(self):
        leftovers = Leftovers(self.store, self.clock, self.staging, [self.deliveries])
        leftovers.log = Logger(namespace="leftovers", observer=self.events.append)
        return leftovers

    async def job(self, status):
        job = a_job(destination_path="file://" + os.path.join(self.deliveries, "out"))
        await self.store.create(job)
        if status != jobs.SUBMITTED:
            await self.store.transition(job.job_id, jobs.SUBMITTED, status, {"stager_path": "/x"})
        return job.job_id

    def make(self, *parts, directory=False):
        path = os.path.join(*parts)
        if directory:
            os.makedirs(os.path.join(path, "sample-002"))
        else:
            with open(path, "w") as handle:
                handle.write("partial")
        return path

    async def test_leftovers_of_inactive_jobs_removed(self):
        """When staged copies and partial deliveries belong to no active job, each is removed with one log line."""
        active, ended, unknown = await self.job(jobs.SUBMITTED), await self.job(jobs.CANCELLED), jobs.new_job_id()
        kept = [self.make(self.staging, active, directory=True), self.make(self.staging, "not-a-job", directory=True),
                self.make(self.deliveries, "out", f".sample-001.transferd-{active}"),
                self.make(self.deliveries, "out", "sample-001")]
        gone = [self.make(self.staging, ended, directory=True), self.make(self.staging, unknown, directory=True),
                self.make(self.deliveries, "out", f".sample-002.transferd-{ended}")]
        os.makedirs(gone[-1] + "-dir")  # not a name the mover writes: ".sample-002.transferd-<id>-dir"
        removed = await self.leftovers().run_once()
        self.assertEqual(sorted(removed), sorted(gone))
        for path in kept + [gone[-1] + "-dir"]:
            self.assertTrue(os.path.exists(path), path)
        for path in gone:
            self.assertFalse(os.path.exists(path), path)
        lines = [event["path"] for event in self.events if event.get("what")]
        self.assertEqual(sorted(lines), sorted(gone))
        self.assertIsNotNone((await self.store.get(ended)).time_copy_freed)

    async def test_second_sweep_looks_only_at_newly_ended_jobs(self):
        """When a sweep has run, the next looks only at jobs that ended since, and finds nothing twice."""
        leftovers = self.leftovers()
        self.assertEqual(await leftovers.run_once(), [])
        ended = await self.job(jobs.CANCELLED)
        self.clock.advance(60)
        partial = self.make(self.deliveries, "out", f".sample-001.transferd-{ended}")
        self.assertEqual(await leftovers.run_once(), [partial])
        self.assertEqual(await leftovers.run_once(), [])


class HousekeepingTests(unittest.TestCase):
    def test_config(self):
        """When [retention] keep is unset, 180 days apply; 0 or empty keeps forever; other values name the key."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "transferd-data", "archive"))
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(workdir)
        self.assertEqual(load_config(None, {}).retention.keep.days, 180)
        self.assertIsNone(load_config(None, {("retention", "keep"): "0"}).retention.keep)
        self.assertIsNone(load_config(None, {("retention", "keep"): ""}).retention.keep)
        from transferd.config import ConfigError

        refused = self.assertRaises(ConfigError, load_config, None, {("retention", "keep"): "6 months"})
        self.assertIn("[retention] keep", str(refused))

    async def test_runs_at_start_and_every_interval(self):
        """When the service starts it sweeps at once, then every interval; a failing pass is logged, not fatal."""
        clock = task.Clock()
        calls = []

        class Part:
            async def run_once(self):
                calls.append(clock.seconds())
                if len(calls) == 1:
                    raise RuntimeError("database away")

        housekeeping = Housekeeping(3600, clock, retention=Part())
        housekeeping.log = Logger(namespace="housekeeping", observer=lambda event: None)
        housekeeping.startService()
        self.addCleanup(housekeeping.stopService)
        clock.advance(3600)
        clock.advance(3600)
        self.assertEqual(calls, [0, 3600, 7200])


class StagedCopyShownTests(unittest.TestCase):
    async def test_stager_path_gone_with_the_copy(self):
        """When a delivered job's staged copy has been freed, /transferStatus and v1 no longer name it."""
        from tests.harness import Harness

        harness = Harness(self.mktemp())
        await harness.start()
        self.addCleanup(harness.close)
        _, body = await harness.request("POST", "/submitTransfer",
                                        data={"product_id": "sample-001", "destination_path": harness.destination})
        job_id = json.loads(body)["job_id"]
        await settled(harness.daemon)
        _, body = await harness.request("GET", f"/transferStatus?job_id={job_id}")
        view = json.loads(body)
        self.assertEqual(view["status"], jobs.SUCCESS)
        self.assertNotIn("stager_path", view)
        self.assertFalse(os.path.exists(os.path.join(harness.staging, job_id)))
        self.assertIsNotNone((await harness.store.get(job_id)).time_copy_freed)
