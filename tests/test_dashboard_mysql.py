"""The dashboard's store queries on a real MariaDB read index ranges, never the whole jobs table (EXPLAIN)."""

from twisted.trial import unittest

from tests import mysql_support
from tests.test_store_mysql import StoreFixture
from transferd import jobs

NOW = 1_700_000_000  # the fixture's clock


class _Recording:
    """A cursor that remembers every statement run through it."""

    def __init__(self, cursor, seen):
        self._cursor, self._seen = cursor, seen

    def execute(self, query, params=()):
        self._seen.append((query, tuple(params)))
        return self._cursor.execute(query, params)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


class DashboardPlanTests(StoreFixture, unittest.TestCase):
    async def test_dashboard_queries_use_indexes(self):
        """Every query behind the overview and the errors view, for everyone and for one submitter, reads a
        range of an index (EXPLAIN: a key, and no full scan of the table)."""
        store = self.open(self.fresh_url())
        await store.migrate()
        old, recent = "2023-11-01 00:00:00", "2023-11-14 21:00:00"  # ten days and a few hours before NOW
        rows = [(f"00000000-0000-4000-8000-{n:012d}", "p", "davs://h%d/d" % (n % 3), "h%d" % (n % 3), status,
                 f"CN=user{n % 7}", when, when, "reason %d" % (n % 5) if status == jobs.ERROR else None)
                for n, (status, when) in enumerate([(jobs.SUCCESS, old)] * 4000 + [(jobs.ERROR, old)] * 500
                                                   + [(jobs.ERROR, recent)] * 60 + [(jobs.SUCCESS, recent)] * 60
                                                   + [(jobs.SUBMITTED, recent)] * 40 + [(jobs.TRANSFERRING, recent)] * 20)]
        connection = mysql_support.admin_connection(self.database)
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        cursor.executemany("INSERT INTO jobs (job_id, product_id, destination_path, destination_host, status,"
                           " submitter, time_submitted, time_updated, detailed_status)"
                           " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
        cursor.execute("ANALYZE TABLE jobs")
        cursor.fetchall()
        await store.fold_job_counts()  # as each round of scheduling passes does
        seen = []
        run = store._run
        store._run = lambda interaction, *args, **options: run(
            lambda db_cursor, *more: interaction(_Recording(db_cursor, seen), *more), *args, **options)
        day = jobs.utc_from_seconds(NOW - 86400)
        for submitter in (None, "CN=user3"):
            await store.count_by_status(submitter)
            await store.activity(day, submitter)
            await store.counts_by("destination_host", day, submitter)
            await store.counts_by("stager_hostname", day, submitter)
            reasons = await store.failure_reasons(day, submitter)
            failed = await store.recent_failures(day, 100, submitter)
        self.assertEqual(len(reasons), 5)
        self.assertTrue(failed and all(job.submitter == "CN=user3" for job in failed))
        for query, params in seen:
            cursor.execute("EXPLAIN " + query, params)
            names = [column[0] for column in cursor.description]
            for plan in (dict(zip(names, row)) for row in cursor.fetchall()):
                if plan["table"] == "job_count_changes":
                    # The kept counts' changes since the last fold, read whole by design (docs/architecture.md,
                    # "Kept job counts"): none here, as the fold has just run.
                    self.assertEqual(self.sql("SELECT COUNT(*) FROM job_count_changes"), ((0,),))
                    continue
                self.assertTrue(plan["key"] and plan["type"] != "ALL", (query, plan))
