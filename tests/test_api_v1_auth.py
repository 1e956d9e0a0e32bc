"""Who sees and cancels what through the v1 API: bearer tokens over real HTTP, own jobs, admins, the audit trail.

Client certificates need TLS and are covered with the real daemon in
tests/test_api_v1_e2e.py.
"""

import json
import os

from twisted.internet import defer

from tests.test_api_v1 import V1TestCase
from transferd import jobs
from transferd.testing.tokens import AUDIENCE, TokenIssuer

ISS = "https://iam.example.org/"
ALICE, BOB, ADMIN = (f"SUB={sub}, ISS={ISS}" for sub in ("alice", "bob", "operator"))


class TokenCase(V1TestCase):
    """The harness accepting bearer tokens of a test issuer, with an admin (tests/test_dashboard.py uses it too)."""

    def setUp(self):
        self.issuer = TokenIssuer(ISS)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        jwks = os.path.join(base, "jwks.json")
        self.issuer.write_jwks(jwks)
        self.audit_path = os.path.join(base, "audit.log")
        self.settings = {("auth", "token_issuers"): f"{ISS} {jwks}", ("auth", "token_audiences"): AUDIENCE,
                         ("auth", "admins"): ADMIN, ("auth", "audit_log"): self.audit_path}
        return super().setUp()

    def as_(self, sub):
        return {"Authorization": f"Bearer {self.issuer.token(sub=sub)}"}

    @defer.inlineCallbacks
    def as_call(self, sub, method, path, body=None):
        return (yield self.call(method, path, body, headers=self.as_(sub)))

    @defer.inlineCallbacks
    def submit_as(self, sub, count=2, **extra):
        code, answer, _ = yield self.as_call(sub, "POST", "/api/v1/jobs", dict({"jobs": [self.item()] * count}, **extra))
        self.assertEqual(code, 200, answer)
        return [r["job_id"] for r in answer["results"]]

    @defer.inlineCallbacks
    def listed(self, sub, query=""):
        code, page, _ = yield self.as_call(sub, "GET", "/api/v1/jobs" + query)
        self.assertEqual(code, 200, page)
        return sorted(view["job_id"] for view in page["jobs"])

    def audit_records(self):
        with open(self.audit_path) as handle:
            return [json.loads(line) for line in handle]


class TokenAccessTests(TokenCase):
    @defer.inlineCallbacks
    def test_own_jobs_only_admins_all(self):
        """Each submitter lists, sees and cancels only its own jobs (403 otherwise); the admin lists and cancels all."""
        alice, bob = (yield self.submit_as("alice")), (yield self.submit_as("bob"))
        self.assertEqual((yield self.listed("alice")), sorted(alice))
        self.assertEqual((yield self.listed("operator")), sorted(alice + bob))
        self.assertEqual((yield self.listed("operator", f"?submitter={ALICE.replace(' ', '%20')}")), sorted(alice))
        self.assertEqual((yield self.listed("alice", f"?submitter={ALICE.replace(' ', '%20')}")), sorted(alice))
        self.assertProblem((yield self.as_call("bob", "GET", f"/api/v1/jobs?submitter={ALICE}")), 403, "only admins")
        self.assertProblem((yield self.as_call("bob", "GET", f"/api/v1/jobs/{alice[0]}")), 403, "someone else")
        self.assertProblem((yield self.as_call("bob", "DELETE", f"/api/v1/jobs/{alice[0]}")), 403, "someone else")
        code, answer, _ = yield self.as_call("bob", "POST", "/api/v1/jobs/cancel", {"job_ids": alice + bob[:1]})
        self.assertEqual((code, answer["job_ids"]), (200, bob[:1]))
        self.assertProblem((yield self.as_call("bob", "POST", "/api/v1/jobs/cancel", {"submitter": ALICE})), 403,
                           "only admins")
        code, answer, _ = yield self.as_call("operator", "POST", "/api/v1/jobs/cancel", {"submitter": ALICE})
        self.assertEqual((code, sorted(answer["job_ids"])), (200, sorted(alice)))
        code, view, _ = yield self.as_call("operator", "GET", f"/api/v1/jobs/{bob[1]}")
        self.assertEqual((code, view["submitter"], view["status"]), (200, BOB, jobs.SUBMITTED))
        self.assertEqual(view["history"][0]["actor"], BOB)

    @defer.inlineCallbacks
    def test_submission_ids_are_per_submitter(self):
        """The same submission_id from two submitters is two batches; from one, the first answer again."""
        alice = yield self.submit_as("alice", count=1, submission_id="nightly")
        bob = yield self.submit_as("bob", count=1, submission_id="nightly")
        self.assertNotEqual(alice, bob)
        self.assertEqual((yield self.submit_as("alice", count=3, submission_id="nightly")), alice)

    @defer.inlineCallbacks
    def test_whoami_and_refusals(self):
        """whoami names the caller and whether it is an admin; without a credential every operation gets a 401 problem."""
        code, body, _ = yield self.as_call("alice", "GET", "/api/v1/whoami")
        self.assertEqual((code, body), (200, {"identity": ALICE, "method": "token", "admin": False}))
        code, body, _ = yield self.as_call("operator", "GET", "/api/v1/whoami")
        self.assertEqual(body["admin"], True)
        for method, path, body in [("GET", "/api/v1/whoami", None), ("GET", "/api/v1/jobs", None),
                                   ("POST", "/api/v1/jobs", {"jobs": [self.item()]}),
                                   ("GET", f"/api/v1/jobs/{jobs.new_job_id()}", None),
                                   ("DELETE", f"/api/v1/jobs/{jobs.new_job_id()}", None),
                                   ("POST", "/api/v1/jobs/cancel", {"status": "SUBMITTED"})]:
            response, content = yield self.h.request(method, path, data=json.dumps(body).encode() if body else None,
                                                     headers={"Content-Type": "application/json"})
            self.assertEqual((response.code, json.loads(content)["status"]), (401, 401), path)
            self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Bearer realm="transferd"'])
        self.assertEqual((yield self.all_jobs()), [])

    @defer.inlineCallbacks
    def test_audit_trail(self):
        """Batches, cancels and refusals are recorded with identity and outcome; reading is not."""
        alice = yield self.submit_as("alice")
        yield self.listed("alice")
        yield self.as_call("alice", "DELETE", f"/api/v1/jobs/{alice[0]}")
        yield self.as_call("bob", "GET", f"/api/v1/jobs/{alice[1]}")
        yield self.call("GET", "/api/v1/jobs")
        records = [(r["action"], r["outcome"], r["identity"], r["job_id"]) for r in self.audit_records()]
        self.assertEqual(records, [("submit", 200, ALICE, None), ("cancel", 200, ALICE, alice[0]),
                                   ("api/v1/jobs/" + alice[1], 403, BOB, alice[1]), ("api/v1/jobs", 401, None, None)])
        self.assertIn("2 accepted", self.audit_records()[0]["msg"])
