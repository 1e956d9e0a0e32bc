"""The dashboard's pages over real HTTP on loopback (tests/harness.py), without a browser: what they show,
what they refuse, the access rule of the v1 API with bearer tokens.  The browser tests are
tests/test_dashboard_browser.py."""

import json
import re

from twisted.internet import defer
from twisted.trial import unittest

from tests.test_api_v1 import V1TestCase
from tests.test_api_v1_auth import ADMIN, ALICE, BOB, TokenCase
from transferd import jobs
from transferd.dashboard import SECURITY_HEADERS
from transferd.dashboard.views import group_reasons, reason_class


class DashboardCase(V1TestCase):
    @defer.inlineCallbacks
    def page(self, path, headers=None, method="GET"):
        """(status, HTML text, response headers) of one page."""
        response, body = yield self.h.request(method, path, headers=headers or {})
        return response.code, body.decode("utf-8"), response.headers

    def assertRefused(self, outcome, status, words):
        code, text, headers = outcome
        self.assertEqual(code, status, text)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertIn(words, re.sub(r"<[^>]+>", "", text).replace("&#x27;", "'"))


class PageTests(DashboardCase):
    @defer.inlineCallbacks
    def test_pages_show_jobs_escaped_with_strict_headers(self):
        """Each page is HTML with a content security policy; what a submitter wrote is shown escaped, never run."""
        answer = yield self.submit([self.item(label="<script>alert(1)</script>")])
        job_id = answer["results"][0]["job_id"]
        for path in ("/", "/jobs", f"/jobs/{job_id}", "/errors"):
            code, text, headers = yield self.page(path)
            self.assertEqual((code, headers.getRawHeaders("content-type")), (200, ["text/html; charset=utf-8"]), path)
            for name, value in SECURITY_HEADERS.items():
                self.assertEqual(headers.getRawHeaders(name), [value])
            self.assertNotIn("<script>alert", text)
            self.assertIn('data-poll="2"', text)  # every page with active jobs updates itself
        code, text, _ = yield self.page(f"/jobs/{job_id}")
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", text)
        self.assertIn(f'data-cancel="{job_id}"', text)
        self.assertIn("queued for staging", text)  # what it waits for, from the v1 API's view

    @defer.inlineCallbacks
    def test_list_filters_through_the_v1_rules(self):
        """The job list takes the v1 API's filters and a time window; an empty form field is no filter."""
        yield self.submit([self.item(label="a"), self.item(label="b")])
        code, text, _ = yield self.page("/jobs?label=a&status=&product_id=&window=1h")
        self.assertEqual(code, 200)
        self.assertEqual(text.count('class="job"'), 1)
        code, text, _ = yield self.page("/jobs?window=all&status=SUBMITTED")
        self.assertEqual(text.count('class="job"'), 2)

    @defer.inlineCallbacks
    def test_list_pages_with_the_api_cursor(self):
        """More jobs than a page: the list links to the older ones with the v1 API's cursor; no job is shown twice."""
        from transferd.dashboard import PAGE_SIZE

        answer = yield self.submit([self.item() for _ in range(PAGE_SIZE + 3)])
        code, first, _ = yield self.page("/jobs")
        older = re.search(r'rel="next" href="([^"]+)"', first).group(1).replace("&amp;", "&")
        code, second, _ = yield self.page(older)
        shown = re.findall(r'aria-label="Job ([0-9a-f-]{36})"', first) + re.findall(r'aria-label="Job ([0-9a-f-]{36})"',
                                                                                   second)
        self.assertEqual(sorted(shown), sorted(result["job_id"] for result in answer["results"]))
        self.assertNotIn('rel="next"', second)

    @defer.inlineCallbacks
    def test_bad_requests_get_html_refusals(self):
        """Unknown or malformed parameters, job ids and paths get an HTML page saying what is wrong."""
        self.assertRefused((yield self.page("/jobs?colour=blue")), 400, "unknown parameter 'colour'")
        self.assertRefused((yield self.page("/jobs?window=2y")), 400, "window must be one of")
        self.assertRefused((yield self.page("/errors?window=all")), 400, "window must be one of")
        self.assertRefused((yield self.page("/jobs?status=DONE")), 400, "DONE is not a job state")
        self.assertRefused((yield self.page("/jobs?cursor=abc")), 400, "cursor is not one this server gave")
        self.assertRefused((yield self.page("/jobs/not-a-job")), 400, "job_id must be a job id")
        self.assertRefused((yield self.page(f"/jobs/{jobs.new_job_id()}")), 404, "no job")
        self.assertRefused((yield self.page("/jobs/a/b")), 404, "no such page")
        self.assertRefused((yield self.page("/static/secret.py")), 404, "no such page")
        self.assertRefused((yield self.page("/", method="POST")), 405, "read with GET")

    @defer.inlineCallbacks
    def test_assets_and_other_paths(self):
        """The assets come from the package; the prototype's and the v1 API's paths still answer JSON."""
        for name, kind in (("dashboard.css", "text/css"), ("dashboard.js", "text/javascript")):
            code, text, headers = yield self.page(f"/static/{name}")
            self.assertEqual((code, headers.getRawHeaders("content-type")[0].split(";")[0]), (200, kind))
            self.assertIsNone(re.search(r"https?:|//[a-z]", re.sub(r"^\s*(//|/\*).*$", "", text, flags=re.M)))  # no other origin
        code, text, _ = yield self.page("/nothing-here")
        self.assertEqual((code, json.loads(text)["error"]), (404, True))
        code, text, _ = yield self.page("/api/v1/whoami")
        self.assertEqual(json.loads(text)["admin"], True)

    @defer.inlineCallbacks
    def test_errors_grouped_by_reason_class(self):
        """Failed jobs are grouped by the kind of reason, most frequent first; a group lists its jobs."""
        answer = yield self.submit([self.item() for _ in range(3)])
        ids = [result["job_id"] for result in answer["results"]]
        for job_id, reason in zip(ids, ("destination /d/1 already exists", "destination /d/2 already exists",
                                        "staging failed: tape 'T17' is offline")):
            self.assertTrue((yield self.h.store.transition(job_id, jobs.SUBMITTED, jobs.ERROR,
                                                           {"detailed_status": reason})))
        code, text, _ = yield self.page("/errors")
        reasons = re.findall(r'<th scope="row"><a href="[^"]+">([^<]+)</a></th><td>(\d+)</td>', text)
        self.assertEqual(reasons, [("destination &lt;path&gt; already exists", "2"),
                                   ("staging failed: tape &#x27;…&#x27; is offline", "1")])
        code, text, _ = yield self.page("/errors?window=7d&reason=destination+%3Cpath%3E+already+exists")
        self.assertEqual(sorted(re.findall(r'aria-label="Job ([0-9a-f-]{36})"', text)), sorted(ids[:2]))


class ReasonClassTests(unittest.TestCase):
    def test_variable_parts_replaced(self):
        """URLs, ids, paths, quoted names and numbers are what vary between reasons of one kind."""
        self.assertEqual(reason_class(f"job {jobs.new_job_id()} has no staged copy"), "job <id> has no staged copy")
        self.assertEqual(reason_class("PUT https://se.example.org:2880/d/f answered 507 Insufficient Storage"),
                         "PUT <url> answered <n> Insufficient Storage")
        self.assertEqual(reason_class("the staged copy /staging/x/prod is missing"), "the staged copy <path> is missing")
        self.assertEqual(reason_class(""), "(no reason recorded)")
        self.assertEqual(len(reason_class("word " * 100)), 200)

    def test_groups_summed_and_ranked(self):
        """Reasons of one kind are summed, the latest time kept, the biggest group first."""
        from datetime import datetime, timezone

        early, late = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 2, tzinfo=timezone.utc)
        groups = group_reasons([("tape 1 offline", 1, early), ("disk full", 2, early), ("tape 2 offline", 2, late)])
        self.assertEqual([(key, count, latest) for key, count, latest, _ in groups],
                         [("tape <n> offline", 3, late), ("disk full", 2, early)])


class TokenDashboardTests(TokenCase, DashboardCase):
    """With bearer tokens: the v1 API's identities and rule."""

    @defer.inlineCallbacks
    def test_own_jobs_only_admins_all(self):
        """Without a credential the page is 401; a user's overview and list count only their own jobs; an admin's all."""
        alice, bob = (yield self.submit_as("alice")), (yield self.submit_as("bob", count=3))
        self.assertRefused((yield self.page("/jobs")), 401, "authentication required")
        for sub, own, total in (("alice", alice, 2), ("bob", bob, 3), ("operator", alice + bob, 5)):
            code, text, _ = yield self.page("/jobs", self.as_(sub))
            self.assertEqual(sorted(re.findall(r'aria-label="Job ([0-9a-f-]{36})"', text)), sorted(own))
            code, text, _ = yield self.page("/", self.as_(sub))
            self.assertIn(f'<span class="count">{total}</span> <span class="badge badge-submitted">', text)
        self.assertRefused((yield self.page("/jobs?submitter=" + BOB.replace(" ", "+"), self.as_("alice"))), 403,
                           "only admins may name another submitter")
        self.assertRefused((yield self.page(f"/jobs/{bob[0]}", self.as_("alice"))), 403, "submitted by someone else")
        code, text, _ = yield self.page("/jobs?submitter=" + ALICE.replace(" ", "+").replace(",", "%2C"),
                                        self.as_("operator"))
        self.assertEqual(sorted(re.findall(r'aria-label="Job ([0-9a-f-]{36})"', text)), sorted(alice))
        self.assertIn(f"Signed in as {ADMIN}", text.replace("&#x27;", "'"))
        self.assertEqual([r["outcome"] for r in self.audit_records() if r["outcome"] in (401, 403)], [401, 403, 403])
