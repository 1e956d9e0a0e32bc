"""Every status code of the REST API, through the Klein handlers in memory (StubTreq)."""

import json

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import settled
from transferd import jobs
from transferd.pipeline import hash_authcode
from transferd.store.sql import DatabaseUnavailable
from tests.harness import Harness


class APITestCase(unittest.TestCase):
    consume = False  # most tests look at the API alone, with no worker moving jobs on

    @defer.inlineCallbacks
    def setUp(self):
        self.h = Harness(self.mktemp())
        yield self.h.start(consume=self.consume)
        self.addCleanup(self.h.close)

    @defer.inlineCallbacks
    def call(self, method, path, **kwargs):
        response, body = yield self.h.request(method, path, **kwargs)
        yield self.h.pipeline.flush_holds()  # settle batched queue holds before tests look at jobs
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        data = json.loads(body)
        self.assertNotIn("Traceback", body.decode("utf-8"))
        return response.code, data

    def submit(self, product_id="sample-001", destination=None, **kwargs):
        data = {"product_id": product_id, "destination_path": destination or self.h.destination}
        return self.call("POST", "/submitTransfer", data=data, **kwargs)

    @defer.inlineCallbacks
    def assertRefused(self, expected_code, call, text):
        """The call fails with expected_code and a JSON error whose msg mentions text."""
        code, data = yield call
        self.assertEqual(code, expected_code, data)
        self.assertIs(data["error"], True)
        self.assertIn(text, data["msg"])
        return data


class SubmitTransferTests(APITestCase):
    @defer.inlineCallbacks
    def test_form_submission_accepted(self):
        """A form-encoded submission answers 202 with a job id, and the job is stored SUBMITTED."""
        code, data = yield self.submit()
        self.assertEqual(code, 202)
        self.assertIs(data["error"], False)
        self.assertTrue(jobs.is_job_id(data["job_id"]))
        self.assertIn("sample-001", data["msg"])
        job = yield self.h.store.get(data["job_id"])
        self.assertEqual((job.status, job.product_id, job.destination_path),
                         (jobs.SUBMITTED, "sample-001", self.h.destination))

    @defer.inlineCallbacks
    def test_json_submission_accepted(self):
        """A JSON body is accepted like a form."""
        body = json.dumps({"product_id": "sample-dir", "destination_path": self.h.destination})
        code, data = yield self.call("POST", "/submitTransfer", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        self.assertEqual(code, 202)
        self.assertEqual((yield self.h.store.get(data["job_id"])).product_id, "sample-dir")

    @defer.inlineCallbacks
    def test_missing_parameters(self):
        """Missing product_id or destination_path answers 400 naming the parameter, job_id null."""
        data = yield self.assertRefused(400, self.call("POST", "/submitTransfer", data={"destination_path": "file:///tmp"}), "product_id")
        self.assertIsNone(data["job_id"])
        yield self.assertRefused(400, self.call("POST", "/submitTransfer", data={"product_id": "sample-001"}), "destination_path")

    @defer.inlineCallbacks
    def test_bad_product_ids(self):
        """Product ids with separators, '..', NUL or excess length are refused with 400."""
        for bad in ["../etc/passwd", "a/b", "a..b", "a\x00b", ".hidden", "x" * 201, "a b"]:
            yield self.assertRefused(400, self.submit(product_id=bad), "product_id")

    @defer.inlineCallbacks
    def test_bad_destinations(self):
        """Destinations that are not URLs, use other schemes, lack a path or escape the roots get 400."""
        cases = [
            ("/tmp/plain/path", "must be a URL"),
            ("gsiftp://host/dir", "not allowed"),
            ("davs://host", "absolute path"),
            ("https:///dir", "no host"),
            ("file:///etc", "must lie under"),
            ("file://" + self.h.deliveries + "/../../etc", "'..'"),
            ("davs://host/dir%00x", "control characters"),
            ("davs://host:99999/dir", "not a valid URL"),
            ("file://remote/dir", "must be local"),
        ]
        for destination, text in cases:
            yield self.assertRefused(400, self.submit(destination=destination), text)

    @defer.inlineCallbacks
    def test_unknown_product_refused_at_once(self):
        """A product the local stager does not have is refused with 404 and no job is created."""
        data = yield self.assertRefused(404, self.submit(product_id="nope"), "not in the archive")
        self.assertIsNone(data["job_id"])
        self.assertEqual((yield self.h.store.jobs_to_redrive(jobs.STATES, 10, include_queue_holds=True)), [])

    @defer.inlineCallbacks
    def test_oversized_body(self):
        """A body over max_body_bytes answers 413 and creates nothing."""
        yield self.assertRefused(413, self.submit(destination=self.h.destination + "/" + "d" * 20000), "larger than")
        self.assertEqual((yield self.h.store.jobs_to_redrive(jobs.STATES, 10, include_queue_holds=True)), [])

    @defer.inlineCallbacks
    def test_malformed_bodies(self):
        """Invalid JSON, a JSON non-object, repeated fields and bad UTF-8 each answer 400."""
        json_headers = {"Content-Type": "application/json"}
        yield self.assertRefused(400, self.call("POST", "/submitTransfer", data=b"{nope", headers=json_headers), "not valid JSON")
        yield self.assertRefused(400, self.call("POST", "/submitTransfer", data=b"[1]", headers=json_headers), "must be an object")
        yield self.assertRefused(400, self.call("POST", "/submitTransfer", data=b"product_id=a&product_id=b&destination_path=x",
                                                headers={"Content-Type": "application/x-www-form-urlencoded"}), "more than once")
        yield self.assertRefused(400, self.call("POST", "/submitTransfer", data=b"product_id=%ff&destination_path=x",
                                                headers={"Content-Type": "application/x-www-form-urlencoded"}), "UTF-8")
        yield self.assertRefused(400, self.call("POST", "/submitTransfer", data=json.dumps({"product_id": 5, "destination_path": "x"}).encode(),
                                                headers=json_headers), "product_id")

    @defer.inlineCallbacks
    def test_deeply_nested_json(self):
        """JSON nested deeper than MAX_JSON_DEPTH answers 400 before it is parsed (no RecursionError, no 500)."""
        json_headers = {"Content-Type": "application/json"}
        for body in (b"[" * 5000 + b"]" * 5000, b'{"a":' * 5 + b"1" + b"}" * 5,
                     json.dumps({"product_id": [[[["x"]]]], "destination_path": "x"}).encode()):
            yield self.assertRefused(400, self.call("POST", "/submitTransfer", data=body, headers=json_headers),
                                     "nested deeper than 4 levels")
        # Brackets inside strings are text, not nesting.
        body = json.dumps({"product_id": "[[[[[[", "destination_path": self.h.destination + "/{{{{{{"}).encode()
        yield self.assertRefused(400, self.call("POST", "/submitTransfer", data=body, headers=json_headers),
                                 "product_id must be a plain name")

    @defer.inlineCallbacks
    def test_wrong_method_and_unknown_path(self):
        """GET on a POST endpoint answers 405 JSON with Allow; an unknown path answers 404 JSON."""
        yield self.assertRefused(405, self.call("GET", "/submitTransfer"), "POST")
        yield self.assertRefused(404, self.call("GET", "/nothing/here"), "no such endpoint")

    @defer.inlineCallbacks
    def test_store_failure_is_500_without_traceback(self):
        """When the store fails, the client gets 500 with a JSON message and no traceback."""
        def broken(*args, **kwargs):
            return defer.fail(RuntimeError("disk on fire"))

        self.h.store.create_many = broken
        data = yield self.assertRefused(500, self.submit(), "internal error")
        self.assertNotIn("disk on fire", data["msg"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class StoreUnavailableTests(APITestCase):
    @defer.inlineCallbacks
    def unavailable(self, method, path, **kwargs):
        """The answer while the store says its database is away: 503 with Retry-After and what to do."""
        def away(*args, **kwargs):
            return defer.fail(DatabaseUnavailable("the database at db:3306/transferd is unreachable (refused)"))

        self.h.store.get = self.h.store.create_many = away
        response, body = yield self.h.request(method, path, **kwargs)
        self.assertEqual((response.code, response.headers.getRawHeaders("retry-after")), (503, ["5"]))
        self.assertEqual(json.loads(body), {"job_id": None, "error": True, "msg": "the job store is unavailable right"
                                                                                  " now; try again in 5 seconds"})

    def test_submit_while_the_database_is_away(self):
        """While the database is away, /submitTransfer answers 503 with Retry-After, not 500."""
        return self.unavailable("POST", "/submitTransfer",
                                data={"product_id": "sample-001", "destination_path": self.h.destination})

    def test_status_while_the_database_is_away(self):
        """While the database is away, /transferStatus answers 503 with Retry-After, not 500."""
        return self.unavailable("GET", "/transferStatus?job_id=" + jobs.new_job_id())


class TransferStatusTests(APITestCase):
    @defer.inlineCallbacks
    def test_status_shows_job_without_callback_code(self):
        """200 shows the job's non-null fields, never the stager callback code."""
        _, submitted = yield self.submit()
        job_id = submitted["job_id"]
        yield self.h.store.update(job_id, jobs.SUBMITTED, {"stager_callback": "f" * 64})
        code, data = yield self.call("GET", "/transferStatus?job_id=" + job_id)
        self.assertEqual(code, 200)
        self.assertEqual(data["job_id"], job_id)
        self.assertEqual(data["status"], jobs.SUBMITTED)
        self.assertEqual(data["product_id"], "sample-001")
        self.assertIn("time_submitted", data)
        for hidden in ("stager_callback", "lease_owner", "lease_until", "time_success", "fts_jobid"):
            self.assertNotIn(hidden, data)

    @defer.inlineCallbacks
    def test_missing_and_malformed_job_id(self):
        """No job_id, or one that is not a UUID, answers 400."""
        yield self.assertRefused(400, self.call("GET", "/transferStatus"), "job_id is required")
        yield self.assertRefused(400, self.call("GET", "/transferStatus?job_id=42"), "UUID")
        yield self.assertRefused(400, self.call("GET", "/transferStatus?job_id=%ff"), "UTF-8")

    @defer.inlineCallbacks
    def test_unknown_job(self):
        """An unknown job id answers 404."""
        yield self.assertRefused(404, self.call("GET", "/transferStatus?job_id=" + jobs.new_job_id()), "no job")

    @defer.inlineCallbacks
    def test_store_failure_is_500(self):
        """A store failure answers 500 with a JSON message."""
        self.h.store.get = lambda job_id: defer.fail(RuntimeError("gone"))
        yield self.assertRefused(500, self.call("GET", "/transferStatus?job_id=" + jobs.new_job_id()), "internal error")
        self.flushLoggedErrors(RuntimeError)


class CancelTransferTests(APITestCase):
    @defer.inlineCallbacks
    def test_cancel_active_job(self):
        """Cancelling an active job answers 200 and the job is CANCELLED with time_cancelled."""
        _, submitted = yield self.submit()
        code, data = yield self.call("POST", "/cancelTransfer", data={"job_id": submitted["job_id"]})
        self.assertEqual((code, data["status"], data["error"]), (200, jobs.CANCELLED, False))
        job = yield self.h.store.get(submitted["job_id"])
        self.assertEqual(job.status, jobs.CANCELLED)
        self.assertIsNotNone(job.time_cancelled)

    @defer.inlineCallbacks
    def test_cancel_terminal_job_conflicts(self):
        """Cancelling a job that has already ended answers 409 and changes nothing."""
        _, submitted = yield self.submit()
        yield self.call("POST", "/cancelTransfer", data={"job_id": submitted["job_id"]})
        yield self.assertRefused(409, self.call("POST", "/cancelTransfer", data={"job_id": submitted["job_id"]}), "already ended")

    @defer.inlineCallbacks
    def test_cancel_unknown_and_malformed(self):
        """Unknown jobs answer 404, malformed ids 400."""
        yield self.assertRefused(404, self.call("POST", "/cancelTransfer", data={"job_id": jobs.new_job_id()}), "no job")
        yield self.assertRefused(400, self.call("POST", "/cancelTransfer", data={"job_id": "x"}), "UUID")
        yield self.assertRefused(400, self.call("POST", "/cancelTransfer", data={}), "required")


class DoneStagingTests(APITestCase):
    @defer.inlineCallbacks
    def staging_job(self, authcode="s3cret-code"):
        """A job in STAGING whose stager was given authcode."""
        _, submitted = yield self.submit()
        job_id = submitted["job_id"]
        yield self.h.store.transition(job_id, jobs.SUBMITTED, jobs.STAGING,
                                      {"stager_callback": hash_authcode(authcode), "stage_attempts": 1})
        return job_id

    def report(self, job_id, **overrides):
        data = {"job_id": job_id, "product_id": "sample-001", "authcode": "s3cret-code", "success": "true",
                "staged_to": "stager.example.org", "path": "/staging/sample-001", "msg": "staged ok"}
        data.update(overrides)
        return self.call("POST", "/doneStaging", data={k: v for k, v in data.items() if v is not None})

    @defer.inlineCallbacks
    def test_success_report_stages_job(self):
        """A valid success report answers 200, records the stager's fields and moves the job to STAGED."""
        job_id = yield self.staging_job()
        files = json.dumps([{"path": "sample-001", "size": 2100, "checksum": "adler32:00000001"}])
        code, data = yield self.report(job_id, files=files)
        self.assertEqual((code, data["error"]), (200, False))
        job = yield self.h.store.get(job_id)
        self.assertEqual(job.status, jobs.STAGED)
        self.assertEqual((job.stager_hostname, job.stager_path, job.stager_status),
                         ("stager.example.org", "/staging/sample-001", "staged ok"))
        self.assertIsNotNone(job.time_staged)
        self.assertEqual(job.files()[0].size, 2100)

    @defer.inlineCallbacks
    def test_failure_report_errors_job(self):
        """A failure report moves the job to ERROR with the stager's message."""
        job_id = yield self.staging_job()
        code, _ = yield self.report(job_id, success="false", staged_to=None, path=None, msg="tape unreadable")
        self.assertEqual(code, 200)
        job = yield self.h.store.get(job_id)
        self.assertEqual(job.status, jobs.ERROR)
        self.assertIn("tape unreadable", job.detailed_status)

    @defer.inlineCallbacks
    def test_wrong_code_refused(self):
        """A wrong authcode answers 403 and changes nothing."""
        job_id = yield self.staging_job()
        yield self.assertRefused(403, self.report(job_id, authcode="guess"), "not valid")
        self.assertEqual((yield self.h.store.get(job_id)).status, jobs.STAGING)

    @defer.inlineCallbacks
    def test_used_code_refused_but_repeat_is_idempotent(self):
        """The same success report again answers 200 with no effect; a different report with the used code gets 403."""
        job_id = yield self.staging_job()
        yield self.report(job_id)
        before = yield self.h.store.get(job_id)
        code, data = yield self.report(job_id)
        self.assertEqual((code, data["msg"]), (200, "staging result already recorded"))
        self.assertEqual((yield self.h.store.get(job_id)), before)
        yield self.assertRefused(403, self.report(job_id, success="false", msg="late failure"), "no longer waiting")
        self.assertEqual((yield self.h.store.get(job_id)), before)

    @defer.inlineCallbacks
    def test_expired_code_refused(self):
        """A report after the stager timeout answers 403."""
        job_id = yield self.staging_job()
        self.h.stager.timeout = -1
        yield self.assertRefused(403, self.report(job_id), "expired")
        self.assertEqual((yield self.h.store.get(job_id)).status, jobs.STAGING)

    @defer.inlineCallbacks
    def test_invalid_parameters(self):
        """Malformed fields answer 400 and change nothing."""
        job_id = yield self.staging_job()
        cases = [
            ({"success": "maybe"}, "success"),
            ({"authcode": None}, "authcode"),
            ({"product_id": "sample-002"}, "does not match"),
            ({"product_id": None}, "product_id"),
            ({"path": None}, "staged_to and path"),
            ({"files": "not json"}, "files"),
            ({"files": json.dumps([{"path": "../x"}])}, "relative path"),
            ({"files": json.dumps([{"path": "x", "size": -1}])}, "whole numbers"),
            ({"msg": "m" * 5000}, "at most"),
        ]
        for overrides, text in cases:
            yield self.assertRefused(400, self.report(job_id, **overrides), text)
        yield self.assertRefused(400, self.report("nope"), "UUID")
        self.assertEqual((yield self.h.store.get(job_id)).status, jobs.STAGING)

    @defer.inlineCallbacks
    def test_unknown_job(self):
        """A report for an unknown job answers 404."""
        yield self.assertRefused(404, self.report(jobs.new_job_id()), "no job")

    @defer.inlineCallbacks
    def test_cancelled_job_refuses_callback(self):
        """After /cancelTransfer, a report for the job is refused with 403."""
        job_id = yield self.staging_job()
        yield self.call("POST", "/cancelTransfer", data={"job_id": job_id})
        yield self.assertRefused(403, self.report(job_id), "no longer waiting")
        self.assertEqual((yield self.h.store.get(job_id)).status, jobs.CANCELLED)


class DeliveryThroughAPITests(APITestCase):
    consume = True

    @defer.inlineCallbacks
    def test_submitted_job_reaches_success(self):
        """With workers running, a submitted product is staged, delivered byte for byte and SUCCESS."""
        _, submitted = yield self.submit()
        yield settled(self.h.daemon)
        _, data = yield self.call("GET", "/transferStatus?job_id=" + submitted["job_id"])
        self.assertEqual(data["status"], jobs.SUCCESS, data)
        for column in ("time_submitted", "time_staging", "time_staged", "time_transferring", "time_success"):
            self.assertIn(column, data)
        with open(self.h.deliveries + "/sample-001", "rb") as handle:
            self.assertEqual(handle.read(), open(self.h.archive + "/sample-001", "rb").read())
