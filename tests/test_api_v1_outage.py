"""The v1 API while its MariaDB is unreachable: 503 problems with Retry-After, nothing half done, then back to normal.

MariaDB is reached through a TCP proxy (tests/tcp_proxy.py) that the test cuts.
"""

import json
from urllib.parse import urlsplit, urlunsplit

from twisted.internet import defer

from tests import mysql_support
from tests.support import wait_for
from tests.tcp_proxy import TCPProxy
from tests.test_api_v1 import JSON, V1TestCase
from transferd import jobs
from transferd.store.sql import DatabaseUnavailable


class OutageTests(V1TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        url = urlsplit(mysql_support.fresh_database(self))
        self.database = url.path.lstrip("/")
        self.proxy = TCPProxy(url.port or 3306)
        port = yield self.proxy.start()
        self.addCleanup(self.proxy.stop)
        netloc = url.netloc.rsplit(":", 1)[0] if url.port else url.netloc
        self.settings = {("database", "url"): urlunsplit(url._replace(netloc=f"{netloc}:{port}"))}
        yield super().setUp()
        self.h.store.retry_delays = (0.0,)  # give up at once: the test needs no patience

    @defer.inlineCallbacks
    def jobs_once_reachable(self):
        """All jobs, or None while the store still answers DatabaseUnavailable."""
        try:
            return (yield self.all_jobs())
        except DatabaseUnavailable:
            return None

    @defer.inlineCallbacks
    def test_store_away_answers_503_then_recovers(self):
        """While the database is away every operation that needs it answers 503 with Retry-After; afterwards all is well."""
        job_id = (yield self.submit([self.item()]))["results"][0]["job_id"]
        yield self.proxy.cut()
        for method, path, body in [("POST", "/api/v1/jobs", {"jobs": [self.item()], "submission_id": "during"}),
                                   ("GET", "/api/v1/jobs", None), ("GET", f"/api/v1/jobs/{job_id}", None),
                                   ("DELETE", f"/api/v1/jobs/{job_id}", None),
                                   ("POST", "/api/v1/jobs/cancel", {"status": "SUBMITTED"})]:
            response, content = yield self.h.request(method, path, data=json.dumps(body).encode() if body else None,
                                                     headers=JSON)
            self.assertEqual((response.code, response.headers.getRawHeaders("retry-after")), (503, ["5"]), path)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/problem+json"])
            self.assertIn("try again", json.loads(content)["detail"])
        response, _ = yield self.h.request("GET", "/api/v1/jobs", headers={"Accept": "application/x-ndjson"})
        self.assertEqual(response.code, 503)
        code, body, _ = yield self.call("GET", "/api/v1/whoami")
        self.assertEqual(code, 200)
        yield self.proxy.start()
        # Back within a few seconds: while the store counts the database as
        # down each operation makes a single try, and on a loaded machine the
        # first connect through the reopened proxy has been seen to fail
        # (errno 115), as a client's first retry after an outage may.
        stored = yield wait_for(self.jobs_once_reachable, timeout=5.0, interval=0.1)
        self.assertEqual([job.job_id for job in stored], [job_id])
        self.assertEqual(mysql_support.execute("SELECT COUNT(*) FROM submissions", database=self.database), ((0,),))
        answer = yield self.submit([self.item()], submission_id="during")
        self.assertEqual(answer["accepted"], 1)
        code, view, _ = yield self.call("GET", f"/api/v1/jobs/{job_id}")
        self.assertEqual((code, view["status"]), (200, jobs.SUBMITTED))
