"""The jobs-by-state query of /metrics on a real MariaDB: it reads an index alone, never the rows."""

from twisted.trial import unittest

from tests import mysql_support
from tests.test_store_mysql import StoreFixture
from transferd.store.sql import SQLJobStore


class JobCountPlanTests(StoreFixture, unittest.TestCase):
    async def test_count_by_status_reads_an_index_only(self):
        """EXPLAIN of the GROUP BY shows a status index used as a covering index ("Using index"), no table read."""
        store = self.open(self.fresh_url())
        await store.migrate()
        statuses = ["SUCCESS"] * 1500 + ["ERROR"] * 300 + ["SUBMITTED"] * 150 + ["TRANSFERRING"] * 50
        rows = [(f"00000000-0000-4000-8000-{n:012d}", "p", "file:///d", status) for n, status in enumerate(statuses)]
        connection = mysql_support.admin_connection(self.database)
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        cursor.executemany("INSERT INTO jobs (job_id, product_id, destination_path, status) VALUES (%s, %s, %s, %s)",
                           rows)
        cursor.execute("ANALYZE TABLE jobs")
        cursor.fetchall()
        cursor.execute("EXPLAIN " + SQLJobStore.COUNT_BY_STATUS)
        names = [column[0] for column in cursor.description]
        (plan,) = [dict(zip(names, row)) for row in cursor.fetchall()]
        self.assertTrue(plan["key"] and plan["key"].startswith("jobs_status"), plan)
        self.assertIn("Using index", plan["Extra"] or "", plan)
        self.assertEqual(await store.count_by_status(),
                         {"SUCCESS": 1500, "ERROR": 300, "SUBMITTED": 150, "TRANSFERRING": 50})
