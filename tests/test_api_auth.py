"""Authorization through the API handlers: bearer tokens, own jobs only, admins, the audit trail.

The handlers run in memory (StubTreq) with a real TokenVerifier reading a
JWKS file; client certificates need real TLS and are covered end to end in
tests/test_e2e_auth.py.
"""

import json
import os

from twisted.internet import defer

from tests.test_api import APITestCase
from transferd import jobs
from transferd.testing.tokens import TokenIssuer
from tests.harness import Harness

ISS = "https://iam.example.org/"
ADMIN = f"SUB=operator, ISS={ISS}"


class AuthorizedAPITests(APITestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.issuer = TokenIssuer(ISS)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        jwks = os.path.join(base, "jwks.json")
        self.issuer.write_jwks(jwks)
        self.audit_path = os.path.join(base, "audit.log")
        self.h = Harness(os.path.join(base, "h"), {
            ("auth", "token_issuers"): f"{ISS} {jwks}",
            ("auth", "token_audiences"): "https://transferd.example.org",
            ("auth", "admins"): ADMIN,
            ("auth", "audit_log"): self.audit_path,
        })
        yield self.h.start(consume=False)
        self.addCleanup(self.h.close)

    def as_user(self, sub):
        return {"Authorization": f"Bearer {self.issuer.token(sub=sub)}"}

    def audit_records(self):
        with open(self.audit_path) as handle:
            return [json.loads(line) for line in handle]

    @defer.inlineCallbacks
    def submit_as(self, sub):
        code, data = yield self.submit(headers=self.as_user(sub))
        self.assertEqual(code, 202, data)
        return data["job_id"]

    @defer.inlineCallbacks
    def test_submitter_recorded_and_shown(self):
        """The token's (iss, sub) becomes the job's submitter, shown by /transferStatus."""
        job_id = yield self.submit_as("alice")
        code, view = yield self.call("GET", f"/transferStatus?job_id={job_id}", headers=self.as_user("alice"))
        self.assertEqual((code, view["submitter"]), (200, f"SUB=alice, ISS={ISS}"))
        self.assertEqual((yield self.h.store.get(job_id)).submitter, f"SUB=alice, ISS={ISS}")

    @defer.inlineCallbacks
    def test_no_credential(self):
        """Without a credential every endpoint but /doneStaging answers 401 with a Bearer challenge; nothing is stored."""
        code, data = yield self.submit()
        self.assertEqual(code, 401)
        self.assertIn("bearer token", data["msg"])
        response, _body = yield self.h.request("GET", "/transferStatus?job_id=" + jobs.new_job_id())
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Bearer realm="transferd"'])
        self.assertEqual((yield self.h.store.jobs_to_redrive(jobs.STATES, 10, include_queue_holds=True)), [])

    @defer.inlineCallbacks
    def test_bad_tokens_refused_with_their_reason(self):
        """Expired, forged and HS256 tokens, and other schemes, answer 401 saying why; the token is never echoed."""
        cases = [
            (self.issuer.token(sub="alice", lifetime=-3600), "expired"),
            (self.issuer.tampered_token(sub="alice"), "signature"),
            (self.issuer.hs256_token(sub="alice"), "HS256"),
            (TokenIssuer("https://evil.example.org/").token(sub="alice"), "not trusted"),
            (self.issuer.token(sub="alice", aud="https://other.example.org"), "audience"),
        ]
        for token, reason in cases:
            code, data = yield self.submit(headers={"Authorization": f"Bearer {token}"})
            self.assertEqual(code, 401, data)
            self.assertIn(reason, data["msg"])
            self.assertNotIn(token, data["msg"])
        code, data = yield self.submit(headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"})
        self.assertEqual(code, 401)
        self.assertIn("Bearer", data["msg"])

    @defer.inlineCallbacks
    def test_others_jobs_refused(self):
        """Bob may neither see nor cancel Alice's job (403); it stays as it was."""
        job_id = yield self.submit_as("alice")
        yield self.assertRefused(403, self.call("GET", f"/transferStatus?job_id={job_id}", headers=self.as_user("bob")),
                                 "submitted by someone else")
        yield self.assertRefused(403, self.call("POST", "/cancelTransfer", data={"job_id": job_id},
                                                headers=self.as_user("bob")), "may not cancel")
        self.assertEqual((yield self.h.store.get(job_id)).status, jobs.SUBMITTED)
        code, data = yield self.call("POST", "/cancelTransfer", data={"job_id": job_id}, headers=self.as_user("alice"))
        self.assertEqual((code, data["status"]), (200, jobs.CANCELLED))

    @defer.inlineCallbacks
    def test_admin_sees_and_cancels_all(self):
        """A configured admin identity sees and cancels anyone's job."""
        job_id = yield self.submit_as("alice")
        code, view = yield self.call("GET", f"/transferStatus?job_id={job_id}", headers=self.as_user("operator"))
        self.assertEqual((code, view["job_id"]), (200, job_id))
        code, data = yield self.call("POST", "/cancelTransfer", data={"job_id": job_id}, headers=self.as_user("operator"))
        self.assertEqual(code, 200, data)

    @defer.inlineCallbacks
    def test_audit_trail(self):
        """Submissions, cancels and refusals are recorded with identity, peer, action, outcome and job id."""
        job_id = yield self.submit_as("alice")
        yield self.call("POST", "/cancelTransfer", data={"job_id": job_id}, headers=self.as_user("bob"))
        yield self.submit(destination="file:///etc", headers=self.as_user("alice"))
        yield self.submit()  # no credential
        yield self.call("GET", f"/transferStatus?job_id={job_id}", headers=self.as_user("alice"))  # allowed: not audited
        records = self.audit_records()
        summary = [(r["action"], r["outcome"], r["identity"], r["job_id"]) for r in records]
        self.assertEqual(summary, [
            ("submit", 202, f"SUB=alice, ISS={ISS}", job_id),
            ("cancel", 403, f"SUB=bob, ISS={ISS}", job_id),
            ("submit", 400, f"SUB=alice, ISS={ISS}", None),
            ("submit", 401, None, None),
        ])
        self.assertTrue(all(r["peer"] and r["time"].endswith("Z") and r["msg"] for r in records))


class OpenAPITests(APITestCase):
    """Without authentication configured (loopback only), jobs have no submitter and anyone may act on them."""

    @defer.inlineCallbacks
    def test_anonymous(self):
        code, data = yield self.submit()
        self.assertEqual(code, 202)
        self.assertIsNone((yield self.h.store.get(data["job_id"])).submitter)
        code, data = yield self.call("POST", "/cancelTransfer", data={"job_id": data["job_id"]})
        self.assertEqual(code, 200)
