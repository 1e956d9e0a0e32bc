"""MySQLJobStore on a real MariaDB: the contract, the prototype upgrade, schema guards, lost connections.

Each test gets its own throw-away database (tests/mysql_support.py).
"""

import json
import os
import random
import socket
from datetime import datetime, timezone

import MySQLdb
from twisted.internet import defer, reactor, task, threads
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest

from tests import mysql_support
from tests.contract_store import JobStoreContract, a_job
from tests.support import wait_for
from transferd import jobs
from transferd.config import parse_database_url
from transferd.scheduler import STAGING
from transferd.store import open_store, schema
from transferd.store.mysql import DatabaseUnavailable, MySQLJobStore
from transferd.store.sql import SchemaTooNew, SubmissionExists

CURRENT = len(MySQLJobStore.migrations)  # the newest schema version

PROTOTYPE_SCHEMA = os.path.join(os.path.dirname(__file__), os.pardir, "legacy", "prototype_schema.sql")


class StoreFixture:
    """Opens stores on a fresh database and closes them (before the database is dropped)."""

    def fresh_url(self, charset="utf8mb4"):
        self.url = mysql_support.fresh_database(self, charset=charset)
        self.database = mysql_support.database_name(self.url)
        return self.url

    def open(self, url=None, clock=None):
        if clock is None:
            clock = task.Clock()
            clock.advance(1_700_000_000)
        store = MySQLJobStore.from_url(parse_database_url(url or self.url), reactor, clock)
        self.addCleanup(store.stopService)
        return store

    def sql(self, statement, args=None):
        return mysql_support.execute(statement, args, database=self.database)


class MySQLJobStoreContractTests(StoreFixture, JobStoreContract, unittest.TestCase):
    async def make_store(self, clock):
        self.fresh_url()
        store = MySQLJobStore.from_url(parse_database_url(self.url), reactor, clock)
        await store.migrate()
        return store


class SchemaTests(StoreFixture, unittest.TestCase):
    async def test_open_store_picks_mysql(self):
        """When the [database] url is mysql://, open_store builds a MySQLJobStore."""
        store = open_store(parse_database_url(self.fresh_url()), reactor, task.Clock())
        self.addCleanup(store.stopService)
        self.assertIsInstance(store, MySQLJobStore)
        self.assertEqual(await store.migrate(), CURRENT)

    async def test_schema_too_new(self):
        """When the database was migrated by a newer transferd, migrate() fails with SchemaTooNew and changes nothing."""
        self.fresh_url()
        await self.open().migrate()
        self.sql("UPDATE schema_version SET version = 999")
        for store in (self.open(), self.open()):  # a second daemon is not stuck behind the migration lock
            error = await self.assertFailure(store.migrate(), SchemaTooNew)
            self.assertIn("version 999", str(error))
            self.assertIn("upgrade transferd", str(error))
        self.assertEqual(self.sql("SELECT version FROM schema_version"), ((999,),))

    async def test_concurrent_migrations(self):
        """When several daemons start at once on a fresh database, each migrates it without error, once."""
        self.fresh_url()
        versions = await defer.gatherResults([self.open().migrate() for _ in range(6)])
        self.assertEqual(versions, [CURRENT] * 6)
        self.assertEqual(self.sql("SELECT version FROM schema_version"), ((CURRENT,),))

    async def test_foreign_jobs_table_untouched(self):
        """When the database has a jobs table that is not the prototype's, migrate() refuses to alter it."""
        self.fresh_url()
        self.sql("CREATE TABLE jobs (id INT PRIMARY KEY, what TEXT)")
        error = await self.assertFailure(self.open().migrate(), RuntimeError)
        self.assertIn("not a transferd", str(error))
        self.assertEqual(len(self.sql("SHOW COLUMNS FROM jobs")), 2)


class PrototypeUpgradeTests(StoreFixture, unittest.TestCase):
    """A prototype database (legacy/prototype_schema.sql, no schema_version) upgrades in place."""

    transferring_id = "6f1c1a4e-8f0e-4a43-9d55-0c6f6d6a1c01"
    success_id = "0b9e8f7a-2c3d-4e5f-8a9b-1c2d3e4f5a6b"

    def prototype_database(self):
        """A latin1 database like the prototype's, with two rows written the prototype's way."""
        self.fresh_url(charset="latin1")
        with open(PROTOTYPE_SCHEMA) as schema:
            self.sql(schema.read())
        connection = mysql_support.admin_connection(self.database)
        try:
            cursor = connection.cursor()
            cursor.execute("SET time_zone = '+00:00'")
            cursor.execute(
                "INSERT INTO jobs (job_id, product_id, status, destination_path, submitter, fts_jobid,"
                " stager_callback, stager_path, stager_hostname, stager_status, time_submitted,"
                " time_staging, time_transferring) VALUES (%s, %s, 'TRANSFERRING', %s, %s, %s, %s, %s, %s,"
                " %s, '2023-05-01 12:00:00', '2023-05-01 12:05:00', '2023-05-01 12:30:00')",
                (self.transferring_id, "caf\u00e9-001", "gsiftp://se.example.org/data", "CN=Ann",
                 "fts-1234", "0123456789abcdef0123456789abcdef", "/stage/cafe-001",
                 "stager01.example.org", "staged"),
            )  # fmt: skip
            # The prototype's sessions ran in the server's local time zone; the instant is what counts.
            cursor.execute("SET time_zone = '+02:00'")
            cursor.execute(
                "INSERT INTO jobs (job_id, product_id, status, detailed_status, destination_path,"
                " fts_jobid, fts_details, stager_callback, time_submitted, time_success)"
                " VALUES (%s, 'sample-002', 'SUCCESS', 'done', 'davs://dcache.example.org:2880/x', 'fts-5678',"
                " '{\"files\": 1}', 'fedcba9876543210fedcba9876543210', '2023-05-02 14:00:00',"
                " '2023-05-02 15:00:00')",
                (self.success_id,),
            )
        finally:
            connection.close()

    async def test_prototype_upgrade(self):
        """When transferd starts on a prototype database, it migrates in place and the old rows read back intact."""
        self.prototype_database()
        store = self.open()
        self.assertEqual(await store.schema_version(), 0)
        self.assertEqual(await store.migrate(), CURRENT)

        old = await store.get(self.transferring_id)
        self.assertEqual(
            (old.status, old.product_id, old.destination_path, old.submitter, old.fts_jobid),
            (jobs.TRANSFERRING, "caf\u00e9-001", "gsiftp://se.example.org/data", "CN=Ann", "fts-1234"),
        )
        self.assertEqual(
            (old.stager_path, old.stager_hostname, old.stager_status),
            ("/stage/cafe-001", "stager01.example.org", "staged"),
        )
        self.assertEqual(old.time_submitted, datetime(2023, 5, 1, 12, 0, tzinfo=timezone.utc))
        self.assertEqual(old.time_staging, datetime(2023, 5, 1, 12, 5, tzinfo=timezone.utc))
        self.assertEqual(old.time_transferring, datetime(2023, 5, 1, 12, 30, tzinfo=timezone.utc))
        self.assertEqual((old.time_staged, old.time_success, old.stage_attempts, old.lease_until), (None, None, 0, None))
        self.assertIsNone(old.stager_callback)  # a raw prototype code is never mistaken for a hash
        view = old.public_view()
        self.assertNotIn("stager_callback", view)
        self.assertEqual(view["time_submitted"], "2023-05-01T12:00:00Z")

        done = await store.get(self.success_id)
        self.assertEqual((done.status, done.detailed_status, done.fts_details), (jobs.SUCCESS, "done", '{"files": 1}'))
        self.assertEqual(done.time_submitted, datetime(2023, 5, 2, 12, 0, tzinfo=timezone.utc))
        self.assertEqual(done.time_success, datetime(2023, 5, 2, 13, 0, tzinfo=timezone.utc))

        # The reconciler picks up the prototype's unfinished work.
        found = await store.jobs_to_redrive(jobs.ACTIVE, 10)
        self.assertEqual([job.job_id for job in found], [self.transferring_id])

        await self.assertFullLifeCycle(store)
        self.assertSchemaUpgraded()

        before = [await store.get(self.transferring_id), await store.get(self.success_id)]
        self.assertEqual(await store.migrate(), CURRENT)
        self.assertEqual([await store.get(self.transferring_id), await store.get(self.success_id)], before)

    async def test_interrupted_upgrade_completes(self):
        """When an upgrade died after some of its ALTERs, the next start finishes it; lax zero dates become NULL."""
        self.prototype_database()
        connection = mysql_support.admin_connection(self.database)
        try:
            cursor = connection.cursor()
            cursor.execute("SET SESSION sql_mode = ''")
            cursor.execute(
                "INSERT INTO jobs (job_id, product_id, status, detailed_status, time_submitted, time_error)"
                " VALUES ('1d2c3b4a-0000-4000-8000-000000000003', 'p3', 'ERROR', 'lost', '2023-05-03 10:00:00',"
                " '0000-00-00 00:00:00')"
            )
            # What a migration killed half-way leaves behind (DDL commits at once).
            cursor.execute("ALTER TABLE jobs CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            cursor.execute("ALTER TABLE jobs ADD COLUMN staged_files MEDIUMTEXT, MODIFY time_submitted DATETIME(6) NULL")
        finally:
            connection.close()
        store = self.open()
        self.assertEqual(await store.migrate(), CURRENT)
        lax = await store.get("1d2c3b4a-0000-4000-8000-000000000003")
        self.assertEqual((lax.status, lax.detailed_status, lax.time_error), (jobs.ERROR, "lost", None))
        self.assertEqual((await store.get(self.transferring_id)).product_id, "caf\u00e9-001")
        self.assertSchemaUpgraded()
        await self.assertFullLifeCycle(store)

    async def test_fresh_database_has_the_upgraded_schema(self):
        """A database transferd creates and one it upgraded from the prototype end with the same keys and columns."""
        self.fresh_url()
        store = self.open()
        self.assertEqual(await store.migrate(), CURRENT)
        self.assertSchemaUpgraded()
        await self.assertFullLifeCycle(store)

    async def test_version_3_database_rekeyed_and_reindexed(self):
        """A database at schema version 3 (job_id the primary key, listing indexes without it) gets version 4."""
        self.fresh_url()
        store = self.open()
        await store.migrate()
        job = a_job()
        await store.create(job)
        self.sql("ALTER TABLE jobs DROP PRIMARY KEY, DROP INDEX jobs_key, DROP COLUMN seq, ADD PRIMARY KEY (job_id),"
                 " DROP INDEX jobs_label, ADD INDEX jobs_label (label, time_submitted)")
        self.sql("UPDATE schema_version SET version = 3")
        upgraded = self.open()
        self.assertEqual(await upgraded.migrate(), CURRENT)
        self.assertSchemaUpgraded()
        self.assertEqual((await upgraded.get(job.job_id)).product_id, job.product_id)
        await self.assertFullLifeCycle(upgraded)

    async def test_version_8_database_gets_its_jobs_counted(self):
        """A database at schema version 8 (no kept counts) has its jobs counted once, and the triggers keep the
        counts from then on."""
        self.fresh_url()
        store = self.open()
        await store.migrate()
        created = [a_job() for _ in range(5)]
        await store.create_many(created)
        await store.transition(created[0].job_id, jobs.SUBMITTED, jobs.CANCELLED)
        for name, _statement in schema.count_triggers("mysql"):
            self.sql(f"DROP TRIGGER {name}")
        self.sql("DROP TABLE job_counts, job_count_changes")
        self.sql("UPDATE schema_version SET version = 8")
        upgraded = self.open()
        self.assertEqual(await upgraded.migrate(), CURRENT)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM job_count_changes"), ((0,),))  # counted: nothing to fold
        self.assertEqual(await upgraded.count_by_status(), {jobs.SUBMITTED: 4, jobs.CANCELLED: 1})
        await upgraded.create(a_job())
        self.assertEqual(await upgraded.count_by_status(), {jobs.SUBMITTED: 5, jobs.CANCELLED: 1})

    async def test_a_fold_leaves_changes_not_committed_yet(self):
        """A fold skips the changes of a transaction still open, without waiting for it; a later fold takes them."""
        self.fresh_url()
        store = self.open()
        await store.migrate()
        created = [a_job() for _ in range(2)]
        await store.create_many(created)
        self.assertEqual(await store.fold_job_counts(), 2)
        connection = mysql_support.admin_connection(self.database)
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        cursor.execute("BEGIN")
        cursor.execute("UPDATE jobs SET status = 'CANCELLED' WHERE job_id = %s", (created[0].job_id,))
        self.assertEqual(await store.fold_job_counts(), 0)  # not blocked: trial's timeout would fail it
        self.assertEqual(await store.count_by_status(), {jobs.SUBMITTED: 2})
        connection.commit()
        self.assertEqual(await store.count_by_status(), {jobs.SUBMITTED: 1, jobs.CANCELLED: 1})
        self.assertEqual(await store.fold_job_counts(), 2)
        self.assertEqual(await store.count_by_status(), {jobs.SUBMITTED: 1, jobs.CANCELLED: 1})
        self.assertEqual(self.sql("SELECT status, total FROM job_counts WHERE counted_by = 'all' ORDER BY status"),
                         (("CANCELLED", 1), ("SUBMITTED", 1)))

    async def assertFullLifeCycle(self, store):
        """New jobs go through every state, with every time column, on the upgraded table."""
        job = a_job(product_id="new-\u6f22")
        await store.create(job)
        steps = [
            (jobs.SUBMITTED, jobs.STAGING, {"stager_callback": "ab" * 32, "stage_attempts": 1}),
            (jobs.STAGING, jobs.STAGED, {"staged_files": json.dumps([{"path": "a", "size": 1}] * 2000)}),
            (jobs.STAGED, jobs.TRANSFERRING, {"fts_jobid": "f" * 36}),
            (jobs.TRANSFERRING, jobs.SUCCESS, {}),
        ]
        for old, new, fields in steps:
            store.clock.advance(1.5)
            self.assertTrue(await store.transition(job.job_id, old, new, fields))
        got = await store.get(job.job_id)
        self.assertEqual((got.status, got.stager_callback, got.fts_jobid), (jobs.SUCCESS, "ab" * 32, "f" * 36))
        self.assertEqual(len(got.files()), 2000)
        times = [got.time_submitted, got.time_staging, got.time_staged, got.time_transferring, got.time_success]
        self.assertEqual([t.timestamp() for t in times], [store.clock.seconds() - 1.5 * n for n in range(4, -1, -1)])
        for end, fields in [(jobs.ERROR, {"detailed_status": "no such product"}), (jobs.CANCELLED, {})]:
            other = a_job()
            await store.create(other)
            self.assertTrue(await store.transition(other.job_id, jobs.SUBMITTED, end, fields))
            got = await store.get(other.job_id)
            self.assertEqual(got.status, end)
            self.assertIsNotNone(getattr(got, jobs.TIME_COLUMN[end]))

    def assertSchemaUpgraded(self):
        columns = dict(
            self.sql(
                "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'jobs'"
            )
        )
        self.assertEqual(set(columns), set(jobs.COLUMNS) | {"seq"})
        # Rows stored in the order they arrived (schema version 4); job_id stays unique.
        keys = {(name, column) for name, column in self.sql(
            "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'jobs' AND NON_UNIQUE = 0")}
        self.assertEqual(keys, {("PRIMARY", "seq"), ("jobs_key", "job_id")})
        label = self.sql("SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()"
                         " AND TABLE_NAME = 'jobs' AND INDEX_NAME = 'jobs_label' ORDER BY SEQ_IN_INDEX")
        self.assertEqual([name for (name,) in label], ["label", "time_submitted", "job_id"])
        self.assertEqual(columns["status"], "varchar(16)")
        self.assertEqual(columns["stager_callback"], "varchar(64)")
        for name in jobs.TIME_COLUMN.values():
            self.assertEqual(columns[name], "datetime(6)")
        self.assertEqual(
            self.sql(
                "SELECT ENGINE, TABLE_COLLATION FROM information_schema.TABLES"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'jobs'"
            ),
            (("InnoDB", "utf8mb4_bin"),),
        )
        self.assertTrue(self.sql("SHOW INDEX FROM jobs WHERE Key_name = 'jobs_status_lease'"))


class LostConnectionTests(StoreFixture, unittest.TestCase):
    """KILLed connections, unreachable servers and deadlocks never take the store down."""

    async def setUp(self):
        self.fresh_url()
        self.store = self.open()
        await self.store.migrate()
        self.job = a_job()
        await self.store.create(self.job)

    async def pool_connection_ids(self):
        """The server ids of the pool's connections, after making several of them busy at once."""
        rows = await defer.gatherResults(
            [self.store.pool.runQuery("SELECT CONNECTION_ID(), SLEEP(0.05)") for _ in range(4)]
        )
        ids = {found[0][0] for found in rows}
        ids |= {connection.thread_id() for connection in list(self.store.pool.connections.values())}
        return ids

    async def test_get_after_kill(self):
        """When every pooled connection has been KILLed, reads still succeed, on fresh connections."""
        ids = await self.pool_connection_ids()
        self.assertGreaterEqual(len(ids), 2)
        mysql_support.kill_connections(ids)
        self.assertEqual((await self.store.get(self.job.job_id)).job_id, self.job.job_id)
        found = await defer.gatherResults([self.store.get(self.job.job_id) for _ in range(6)])
        self.assertEqual({job.status for job in found}, {jobs.SUBMITTED})

    async def test_transition_after_kill(self):
        """When the pooled connections were KILLed while idle, a transition pings, reconnects and succeeds."""
        self.store.ping_idle_after = 0.2
        mysql_support.kill_connections(await self.pool_connection_ids())
        await task.deferLater(reactor, 0.3, lambda: None)  # idle past ping_idle_after
        self.assertTrue(await self.store.transition(self.job.job_id, jobs.SUBMITTED, jobs.STAGING))
        self.assertIsNotNone(await self.store.take_lease(self.job.job_id, [jobs.STAGING], "w", 30))
        self.assertEqual((await self.store.get(self.job.job_id)).status, jobs.STAGING)

    async def test_migrate_after_kill(self):
        """When the pooled connections were KILLed, migrate() (safe to re-run) retries and succeeds."""
        mysql_support.kill_connections(await self.pool_connection_ids())
        self.assertEqual(await self.store.migrate(), CURRENT)
        self.assertIsNotNone(await self.store.get(self.job.job_id))

    async def run_killed(self, idempotent):
        """Run an UPDATE-then-SLEEP interaction, KILL its connection mid-query; fire with its outcome."""
        victims = []

        def interaction(cursor):
            cursor.execute("UPDATE jobs SET fts_jobid = 'half-done' WHERE job_id = %s", (self.job.job_id,))
            cursor.execute("SELECT CONNECTION_ID()")
            victims.append(cursor.fetchone()[0])
            cursor.execute("SELECT SLEEP(%s)", (5 if len(victims) == 1 else 0,))
            return len(victims)

        d = self.store._run(interaction, idempotent=idempotent)
        await wait_for(lambda: victims)
        mysql_support.kill_connections(victims[:1])
        return d

    async def test_idempotent_interaction_killed_midway_is_retried(self):
        """When a connection is KILLed in the middle of an idempotent operation, it runs again on a fresh connection."""
        started = reactor.seconds()
        attempts = await (await self.run_killed(idempotent=True))
        self.assertEqual(attempts, 2)
        self.assertLess(reactor.seconds() - started, 4)

    async def test_non_idempotent_interaction_killed_midway_fails_clearly(self):
        """When a connection is KILLed in the middle of a non-idempotent operation, it fails with DatabaseUnavailable and the store goes on."""
        d = await self.run_killed(idempotent=False)
        error = await self.assertFailure(d, DatabaseUnavailable)
        self.assertIn("not safe to repeat", str(error))
        got = await self.store.get(self.job.job_id)
        self.assertIsNone(got.fts_jobid)  # the uncommitted UPDATE died with its connection
        self.assertTrue(await self.store.transition(self.job.job_id, jobs.SUBMITTED, jobs.STAGING))

    async def test_transition_chosen_as_deadlock_victim_runs_again(self):
        """When a transition is the victim of a real deadlock, it runs again once the other transaction ends."""
        other = mysql_support.admin_connection(self.database)
        self.addCleanup(other.close)
        cursor = other.cursor()
        cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # takes gap locks
        cursor.execute("CREATE TABLE filler (n INT PRIMARY KEY)")
        cursor.execute("BEGIN")
        # Many rows changed: InnoDB rolls back the lighter transaction, the store's.
        cursor.executemany("INSERT INTO filler VALUES (%s)", [(n,) for n in range(500)])
        cursor.execute("SELECT event_id FROM job_events WHERE event_id > 0 FOR UPDATE")  # no new event may go in
        transition = self.store.transition(self.job.job_id, jobs.SUBMITTED, jobs.STAGING)
        # The store's transaction holds the job's row and waits to record the event ...
        await wait_for(lambda: self.sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE db = DATABASE()"
                                        " AND info LIKE 'INSERT INTO job_events%'")[0][0] == 1)
        # ... and now this one waits for the job's row: a deadlock, which rolls the store's transaction back.
        await threads.deferToThread(cursor.execute, "UPDATE jobs SET label = 'other' WHERE job_id = %s",
                                    (self.job.job_id,))
        await threads.deferToThread(cursor.execute, "COMMIT")
        self.assertTrue(await transition)
        job = await self.store.get(self.job.job_id)
        self.assertEqual((job.status, job.label), (jobs.STAGING, "other"))
        events = await self.store.events(self.job.job_id)
        self.assertEqual([event["new_status"] for event in events], [jobs.SUBMITTED, jobs.STAGING])

    async def test_transition_after_lock_wait_timeout_runs_again(self):
        """A transition that waited too long for a row lock (1205) runs again once the lock is gone, and once only."""
        store = self.open()
        opened = store.pool.openfun

        def short_lock_waits(connection):  # this store's sessions only: the shared server keeps its 50 s
            opened(connection)
            connection.cursor().execute("SET SESSION innodb_lock_wait_timeout = 1")

        store.pool.openfun = short_lock_waits
        retries = []
        store.log = Logger(observer=lambda event: retries.append(event) if "rolled" in event["log_format"] else None)
        other = mysql_support.admin_connection(self.database)
        self.addCleanup(other.close)
        cursor = other.cursor()
        cursor.execute("BEGIN")
        cursor.execute("SELECT status FROM jobs WHERE job_id = %s FOR UPDATE", (self.job.job_id,))
        transition = store.transition(self.job.job_id, jobs.SUBMITTED, jobs.STAGING)
        await wait_for(lambda: retries, timeout=10)  # the first try timed out waiting for the row: 1205
        self.assertIn("Lock wait timeout", formatEvent(retries[0]))
        await threads.deferToThread(cursor.execute, "COMMIT")
        self.assertTrue(await transition)
        self.assertEqual((await store.get(self.job.job_id)).status, jobs.STAGING)
        events = await store.events(self.job.job_id)
        self.assertEqual([event["new_status"] for event in events], [jobs.SUBMITTED, jobs.STAGING])

    async def test_unreachable_server(self):
        """When the server cannot be reached, the first operation fails with DatabaseUnavailable after a few quick retries, the next at once."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # nothing listens here once the probe is closed
        store = self.open(f"mysql://root@127.0.0.1:{port}/nowhere")
        store.retry_delays = (0.0, 0.01)
        tries = []
        run = store.pool.runWithConnection
        store.pool.runWithConnection = lambda *args: tries.append(1) or run(*args)
        for operation, expected in ((store.get, 3), (store.create, 1), (store.get, 1)):
            error = await self.assertFailure(operation(a_job()) if operation == store.create
                                             else operation(self.job.job_id), DatabaseUnavailable)
            self.assertTrue(str(error).startswith(f"the database at 127.0.0.1:{port}/nowhere is unreachable"
                                                  f" (Can't connect to server on '127.0.0.1'"), error)
            self.assertEqual(len(tries), expected)
            tries.clear()



class GroupCommitTests(StoreFixture, unittest.TestCase):
    """A job's short operations, asked for while the database is busy, share transactions, each still on its own."""

    async def setUp(self):
        self.fresh_url()
        self.store = self.open()
        await self.store.migrate()
        self.jobs = [a_job() for _ in range(30)]
        await self.store.create_many(self.jobs)
        self.store.group.in_flight = 1  # one transaction at a time: the others gather behind it

    def busy(self, seconds=0.3):
        """An operation that keeps the group's one transaction running for a while."""
        return self.store._run(lambda cursor: cursor.execute("SELECT SLEEP(%s)", (seconds,)), together="")

    def counted(self):
        return self.store.group.transactions, self.store.group.operations

    async def test_operations_asked_for_together_share_one_transaction(self):
        """30 transitions asked for while a transaction runs go in one more; each commits, with its history row."""
        transactions, operations = self.counted()
        busy = self.busy()
        moved = [self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING) for job in self.jobs]
        await busy
        self.assertEqual(await defer.gatherResults(moved), [True] * 30)
        self.assertEqual(self.counted(), (transactions + 2, operations + 31))
        self.assertEqual(self.sql("SELECT COUNT(*) FROM jobs WHERE status = 'STAGING'"), ((30,),))
        self.assertEqual(self.sql("SELECT COUNT(*) FROM job_events WHERE new_status = 'STAGING'"), ((30,),))
        self.assertEqual(self.sql("SELECT COUNT(*) FROM outbox WHERE state = 'STAGING'"), ((30,),))

    async def test_a_failing_operation_is_undone_alone(self):
        """An operation that fails after writing (or a duplicate submission) is undone; the others in its transaction commit."""
        first, second, third = self.jobs[:3]
        await self.store.create_many([a_job()], submission=jobs.Submission("CN=Ann", "s-1", {"job_ids": []}))

        def half_done(cursor):
            cursor.execute("UPDATE jobs SET label = 'half-done' WHERE job_id = %s", (second.job_id,))
            raise ValueError("changed its mind")

        busy = self.busy()
        before = self.counted()
        moved = self.store.transition(first.job_id, jobs.SUBMITTED, jobs.STAGING)
        failed = self.store._run(half_done, idempotent=False, together=second.job_id)
        again = self.store.create_many([a_job()], submission=jobs.Submission("CN=Ann", "s-1", {"job_ids": []}))
        labelled = self.store.update(third.job_id, jobs.SUBMITTED, {"label": "kept"})
        await busy
        self.assertTrue(await moved)
        await self.assertFailure(failed, ValueError)
        await self.assertFailure(again, SubmissionExists)
        self.assertTrue(await labelled)
        self.assertEqual(self.counted()[0], before[0] + 1)  # all four in one transaction
        self.assertEqual(self.sql("SELECT label FROM jobs WHERE job_id IN (%s, %s) ORDER BY label",
                                  (second.job_id, third.job_id)), ((None,), ("kept",)))
        self.assertEqual((await self.store.get(first.job_id)).status, jobs.STAGING)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM jobs"), ((31,),))  # the duplicate submission added none

    async def test_a_deadlock_runs_every_operation_in_the_transaction_again(self):
        """When the server rolls a shared transaction back, each operation in it runs again, and takes effect once."""
        tries = []

        def deadlocked_once(cursor):
            cursor.execute("UPDATE jobs SET label = 'victim' WHERE job_id = %s", (self.jobs[0].job_id,))
            tries.append(1)
            if len(tries) == 1:
                raise MySQLdb.OperationalError(1213, "Deadlock found when trying to get lock")
            return len(tries)

        busy = self.busy()
        victim = self.store._run(deadlocked_once, idempotent=False, together=self.jobs[0].job_id)
        moved = [self.store.transition(job.job_id, jobs.SUBMITTED, jobs.STAGING) for job in self.jobs[1:]]
        await busy
        self.assertEqual(await victim, 2)
        self.assertEqual(await defer.gatherResults(moved), [True] * 29)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM job_events WHERE new_status = 'STAGING'"), ((29,),))
        self.assertEqual(self.sql("SELECT label FROM jobs WHERE job_id = %s", (self.jobs[0].job_id,)), (("victim",),))

    async def test_job_rows_are_locked_in_order(self):
        """Operations on many jobs asked for in any order, beside UPDATEs of many jobs at once: no deadlock."""
        rolled = []
        self.store.log = Logger(observer=lambda event: rolled.append(event) if "rolled" in event["log_format"] else None)
        self.store.group.in_flight = 2
        ids = sorted(job.job_id for job in self.jobs)
        shuffle = random.Random(7).sample
        for round_number in range(20):
            work = [self.store.hold_in_queue(jobs.SUBMITTED, ids, 30) for _ in range(2)]
            work += [self.store.update(job_id, jobs.SUBMITTED, {"label": f"round {round_number}"})
                     for job_id in shuffle(ids, len(ids))]
            await defer.gatherResults(work)
        self.assertEqual([formatEvent(event) for event in rolled], [])
        self.assertEqual(self.sql("SELECT DISTINCT label FROM jobs"), (("round 19",),))

    async def test_a_lost_connection_fails_only_what_is_unsafe_to_repeat(self):
        """A connection KILLed mid-transaction: a read in it runs again; a transition in it fails with DatabaseUnavailable."""
        victims = []

        def sleeper(cursor):
            cursor.execute("SELECT CONNECTION_ID()")
            victims.append(cursor.fetchone()[0])
            cursor.execute("SELECT SLEEP(%s)", (5 if len(victims) == 1 else 0,))

        busy = self.busy(0.2)
        moved = self.store.transition(self.jobs[0].job_id, jobs.SUBMITTED, jobs.STAGING)
        read = self.store.get(self.jobs[1].job_id)
        slept = self.store._run(sleeper, together="")
        await busy
        await wait_for(lambda: victims)
        mysql_support.kill_connections(victims[:1])
        error = await self.assertFailure(moved, DatabaseUnavailable)
        self.assertIn("not safe to repeat", str(error))
        self.assertEqual((await read).job_id, self.jobs[1].job_id)
        await slept
        self.assertEqual((await self.store.get(self.jobs[0].job_id)).status, jobs.SUBMITTED)  # rolled back
        self.assertTrue(await self.store.transition(self.jobs[0].job_id, jobs.SUBMITTED, jobs.STAGING))


class _RecordingCursor:
    """A cursor that keeps each statement it runs, with its parameters."""

    def __init__(self, cursor, statements):
        self._cursor, self._statements = cursor, statements

    def execute(self, query, params=None):
        self._statements.append((query, params))
        return self._cursor.execute(query, params)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


def _tables_read(plan):
    """The table entries of an ANALYZE FORMAT=JSON plan."""
    if isinstance(plan, dict):
        found = [plan["table"]] if isinstance(plan.get("table"), dict) else []
        return found + [table for value in plan.values() for table in _tables_read(value)]
    if isinstance(plan, list):
        return [table for value in plan for table in _tables_read(value)]
    return []


class PeriodicQueryTests(StoreFixture, unittest.TestCase):
    """The periodic queries read only the rows of the work they find, however many jobs wait or run."""

    async def setUp(self):
        self.fresh_url()
        self.store = self.open(clock=reactor)
        await self.store.migrate()
        self.statements = []
        interact = self.store._interact

        def recording(conn, interaction, args, ping_after):
            return interact(conn, lambda cursor, *rest: interaction(_RecordingCursor(cursor, self.statements), *rest),
                            args, ping_after)

        self.store._interact = recording
        self.store.group.interact = recording
        # Many jobs nobody needs to re-drive: free ones waiting for the scheduler, and ones waiting on a service.
        for status, count, lease in (("SUBMITTED", 3000, "NULL"), ("STAGED", 1000, "NULL"),
                                     ("STAGING", 1500, "UNIX_TIMESTAMP() + 86400"),
                                     ("TRANSFERRING", 1500, "UNIX_TIMESTAMP() + 86400"),
                                     ("SUBMITTED", 5, "1"), ("STAGING", 3, "1")):
            self.sql(f"INSERT INTO jobs (job_id, product_id, destination_path, status, time_submitted, time_updated,"
                     f" lease_until, poll_slot, share) SELECT MD5(CONCAT(seq, '{status}', {count}, RAND())), 'p',"
                     f" 'gsiftp://h/x', '{status}', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), {lease}, seq % 1024, 's'"
                     f" FROM seq_1_to_{count}")
        self.sql("ANALYZE TABLE jobs")

    def rows_read(self):
        """The most rows any SELECT recorded since the last call reads, by ANALYZE of the same statement."""
        selects = [(query, params) for query, params in self.statements if query.lstrip().upper().startswith("SELECT")]
        del self.statements[:]
        self.assertTrue(selects)
        most = 0
        for query, params in selects:
            connection = mysql_support.admin_connection(self.database)
            try:
                cursor = connection.cursor()
                cursor.execute("ANALYZE FORMAT=JSON " + query, params)
                plan = json.loads(cursor.fetchone()[0].replace("\\0", ""))
            finally:
                connection.close()
            most = max([most] + [float(table.get("r_rows") or 0) for table in _tables_read(plan)])
        return most

    async def test_expired_leases_are_found_by_a_range(self):
        """Releasing expired SUBMITTED/STAGED jobs reads the 5 expired rows, not the 4,000 free ones."""
        self.assertEqual(await self.store.release_to_scheduler((jobs.SUBMITTED, jobs.STAGED), 1000), 5)
        self.assertLessEqual(self.rows_read(), 5)

    async def test_jobs_to_redrive_are_found_by_a_range(self):
        """Finding STAGING/TRANSFERRING jobs to re-drive reads the 3 free or expired rows, not the 3,000 waiting."""
        self.assertEqual(len(await self.store.jobs_to_redrive((jobs.STAGING, jobs.TRANSFERRING), 1000)), 3)
        self.assertLessEqual(self.rows_read(), 3)

    async def test_scheduling_counts_read_the_kept_counts(self):
        """A pass's counts read a few rows of job_counts, not an index entry for each of the 3,005 SUBMITTED and
        1,503 STAGING jobs; before the changes are folded in, a row per change besides."""
        await self.store.fold_job_counts()
        del self.statements[:]
        counts = await self.store.scheduling_counts(STAGING, hosts=True)
        self.assertEqual((counts.waiting, counts.released, counts.running, counts.hosts),
                         ({"s": 3000}, {"s": 5}, {"s": 1503}, {"": 1508}))  # these jobs have no host
        self.assertLessEqual(self.rows_read(), 10)

    async def test_metrics_count_reads_a_row_per_state(self):
        """count_by_status (/metrics) reads job_counts' rows of all jobs, not the jobs."""
        await self.store.fold_job_counts()
        del self.statements[:]
        self.assertEqual(await self.store.count_by_status(),
                         {"SUBMITTED": 3005, "STAGED": 1000, "STAGING": 1503, "TRANSFERRING": 1500})
        self.assertLessEqual(self.rows_read(), 10)

    async def test_a_fold_reads_the_changes_it_folds(self):
        """A fold reads the changes since the last one (two per job that moved), not the counts or the jobs."""
        await self.store.fold_job_counts()
        self.sql("UPDATE jobs SET status = 'CANCELLED', lease_until = NULL WHERE status = 'SUBMITTED'"
                 " AND lease_until = 1")
        del self.statements[:]
        self.assertEqual(await self.store.fold_job_counts(), 10)
        self.assertLessEqual(self.rows_read(), 10)

    async def test_a_lanes_due_events_are_found_without_the_delivered_ones(self):
        """An AMQP lane claims its 3 due deliveries reading those, not the 5,000 it delivered before."""
        from transferd.store.outbox import Outbox

        self.sql("INSERT INTO event_deliveries (event_id, job_id, target, status, attempts, next_attempt)"
                 " SELECT seq, MD5(seq), 'amqp', 'delivered', 1, 0 FROM seq_1_to_5000")
        await self.store.create_many([a_job() for _ in range(3)])
        self.sql("INSERT INTO event_deliveries (event_id, job_id, target, status, attempts, next_attempt)"
                 " SELECT event_id, job_id, 'amqp', 'pending', 0, 0 FROM job_events")
        self.sql("ANALYZE TABLE event_deliveries")
        claimed = await Outbox(self.store).claim("dispatcher", 30, 200, targets=("amqp",), runs=True)
        self.assertEqual(len(claimed), 3)
        self.assertLessEqual(self.rows_read(), 3)
