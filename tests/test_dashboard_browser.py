"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, on the real daemon.

Each test starts twistd (tests/daemon.py, or over HTTPS with client
certificates: tests/test_e2e_auth.py) and runs the browser in a thread, so
the reactor keeps running; the browser's own request context submits jobs
through /api/v1, with the same certificate as its pages.  The runs write the
screenshots of docs/screenshots/, which the README shows.  Without Chromium
at /usr/bin/chromium these tests fail (scripts/test.sh installs it); they
never download a browser.
"""

import json
import os
import re

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.daemon import Daemon, daemon_config, free_port
from tests.test_e2e_auth import ExposedDaemonTestCase, dn
from transferd import jobs, sample
from transferd.testing import x509 as testx509

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "screenshots")
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 15000  # the longest any page may take to show what a test waits for

# Text whose contrast with its background is under WCAG AA's 4.5:1, as [text, ratio] pairs.
LOW_CONTRAST = """() => {
  const rgb = (text) => text.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
                                     .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => { for (; el; el = el.parentElement) { const c = rgb(getComputedStyle(el).backgroundColor);
                                   if (c.length < 4 || c[3] > 0) return c; } return [255, 255, 255]; };
  const low = [];
  for (const el of document.querySelectorAll("body *")) {
    const text = [...el.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent.trim()).join("");
    const style = getComputedStyle(el);
    if (!text || el.offsetParent === null || el.disabled || style.visibility === "hidden") continue;
    const [a, b] = [lum(rgb(style.color)), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) low.push([text, ratio]);
  }
  return low;
}"""
UNLABELLED = "() => [...document.querySelectorAll('input, select')].filter((e) => e.labels.length === 0).map((e) => e.name)"
# The elements that reach past the right edge of the window (a page that would scroll sideways).
OVERFLOWING = """() => document.documentElement.scrollWidth <= document.documentElement.clientWidth ? [] :
  [...document.querySelectorAll("body *")].filter((e) => e.getBoundingClientRect().right
     > document.documentElement.clientWidth + 1).map((e) => e.tagName.toLowerCase() + "." + e.className + ": "
     + e.textContent.slice(0, 40) + " " + document.documentElement.scrollWidth)"""


def in_browser(scenario, *args):
    """Run scenario(browser, *args) in a thread with a fresh headless Chromium; a Deferred of its result."""
    def run():
        from playwright.sync_api import sync_playwright

        if not os.access(CHROMIUM, os.X_OK):
            raise AssertionError(f"no Chromium at {CHROMIUM}: install Debian's chromium (scripts/test.sh does)")
        with sync_playwright() as playwright:
            # --no-sandbox: Chromium's sandbox refuses to run as root, as the suite does on CI.
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                return scenario(browser, *args)
            finally:
                browser.close()

    return threads.deferToThread(run)


def new_page(browser, viewport=WIDE, **options):
    context = browser.new_context(viewport=viewport, **options)
    context.set_default_timeout(WAIT_MS)
    return context, context.new_page()


def submit(context, url, items):
    """The job ids of a batch submitted through POST /api/v1/jobs, by the browser context's identity."""
    response = context.request.post(url + "/api/v1/jobs", data=json.dumps({"jobs": items}),
                                    headers={"Content-Type": "application/json"})
    answer = response.json()
    assert response.status == 200 and answer["refused"] == 0, answer
    return [result["job_id"] for result in answer["results"]]


def job_state(context, url, job_id):
    return context.request.get(f"{url}/api/v1/jobs/{job_id}").json()["status"]


def row_state(page, job_id):
    """The state cell of a job's row in the job list."""
    return page.locator(f'tr:has(a[aria-label="Job {job_id}"]) td[data-status]')


def listed(page):
    """The job ids the job list shows."""
    return {label.removeprefix("Job ") for label in page.locator("a.job").evaluate_all(
        "links => links.map((a) => a.getAttribute('aria-label'))")}


def screenshot(page, name):
    os.makedirs(SCREENSHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SCREENSHOTS, name), full_page=True)


def accessible(test, page):
    """Every field of the page has a label, and all its text meets WCAG AA contrast."""
    test.assertEqual(page.evaluate(UNLABELLED), [])
    test.assertEqual(page.evaluate(LOW_CONTRAST), [])


class LoopbackDaemon(unittest.TestCase):
    """The daemon on loopback without authentication: the dashboard shows every job."""

    timeout = 60
    delay = "1"  # seconds each staging takes (the local stager's simulated recall)

    @defer.inlineCallbacks
    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        self.deliveries = os.path.join(self.workdir, "deliveries")
        os.makedirs(os.path.join(self.deliveries, "taken"))
        with open(os.path.join(self.deliveries, "taken", "sample-001"), "w") as handle:
            handle.write("already here")  # a delivery there fails: the destination exists
        sample.create(os.path.join(self.workdir, "archive"))
        port = free_port()
        self.daemon = Daemon(self.workdir, daemon_config(self.workdir, port, stager={"delay": self.delay}), port)
        self.addCleanup(self.daemon.stop)
        yield self.daemon.start()

    def item(self, product, where, label):
        return {"product_id": product, "destination_path": "file://" + os.path.join(self.deliveries, where),
                "label": label}


class LoopbackDashboardTests(LoopbackDaemon):
    def test_live_list_filters_timeline_errors(self):
        """A job submitted through the API reaches SUCCESS on the open job list without a reload; the list
        filters by label from the keyboard; the job's page tells its history; its failure shows in the errors view."""
        url = self.daemon.url

        def scenario(browser):
            context, page = new_page(browser)
            page.goto(url + "/jobs")
            page.evaluate("window.stayed = true")
            good, other = submit(context, url, [self.item("sample-001", "a", "run-a"),
                                                self.item("sample-002", "b", "run-b")])
            (bad,) = submit(context, url, [self.item("sample-001", "taken", "run-c")])
            row = row_state(page, good)
            row.wait_for()  # it appears on the open page by itself ...
            page.wait_for_function("id => document.querySelector(`tr:has(a[aria-label='Job ${id}']) td[data-status]`)"
                                   "?.dataset.status === 'SUCCESS'", arg=good, timeout=WAIT_MS)
            self.assertTrue(page.evaluate("window.stayed === true"), "the page was reloaded")  # ... and changes there
            self.assertEqual(row.inner_text(), jobs.SUCCESS)
            self.assertEqual(listed(page), {good, other, bad})
            page.wait_for_function("() => !document.querySelector('td[data-status=STAGING], td[data-status=SUBMITTED],"
                                   " td[data-status=STAGED], td[data-status=TRANSFERRING]')", timeout=WAIT_MS)
            screenshot(page, "jobs.png")
            accessible(self, page)

            page.get_by_label("Label").fill("run-a")
            page.get_by_label("Label").press("Enter")
            page.wait_for_url(re.compile(r"label=run-a"))
            self.assertEqual(listed(page), {good})
            page.get_by_label("State").select_option(jobs.ERROR)
            page.get_by_label("Label").fill("")
            page.get_by_role("button", name="Filter").click()
            page.wait_for_url(re.compile(r"status=ERROR"))
            self.assertEqual(listed(page), {bad})

            page.goto(url + "/jobs")
            page.get_by_role("link", name=f"Job {good}").click()
            page.wait_for_url(f"{url}/jobs/{good}")
            steps = page.locator("#timeline li")
            self.assertEqual([step.locator(".badge").last.inner_text() for step in steps.all()],
                             [jobs.SUBMITTED, jobs.STAGING, jobs.STAGED, jobs.TRANSFERRING, jobs.SUCCESS])
            self.assertIn("sample-001", page.locator("#files").inner_text())
            self.assertIn("Staged to host", page.locator("#stager").inner_text())
            screenshot(page, "job.png")
            accessible(self, page)

            page.get_by_role("link", name="Errors").click()
            reason = page.get_by_role("link", name=re.compile("destination <path> already exists"))
            self.assertEqual(reason.locator("xpath=ancestor::tr/td[1]").inner_text(), "1")
            reason.click()
            self.assertEqual(listed(page), {bad})
            self.assertIn(os.path.join(self.deliveries, "taken", "sample-001"), page.locator("#failed").inner_text())
            screenshot(page, "errors.png")
            accessible(self, page)

            page.get_by_role("link", name="Overview").click()
            cards = {card.locator(".badge").inner_text(): int(card.locator(".count").inner_text())
                     for card in page.locator("#states .card").all()}
            self.assertEqual((cards[jobs.SUCCESS], cards[jobs.ERROR], cards[jobs.SUBMITTED]), (2, 1, 0))
            activity = page.locator("#activity tbody tr").first.locator("td").all_inner_texts()
            self.assertEqual(activity[:3], ["3", "2", "1"])  # last hour: submitted, succeeded, failed
            local = page.locator("#destination-hosts tbody tr").first.locator("td").all_inner_texts()
            self.assertEqual(local, ["0", "0", "2", "1", "67 %"])
            screenshot(page, "overview.png")
            accessible(self, page)

            _, small = new_page(browser, PHONE)
            for path in ("/", "/jobs", f"/jobs/{good}", "/errors"):
                small.goto(url + path)
                self.assertEqual(small.evaluate(OVERFLOWING), [], f"{path} is wider than a phone")
            small.goto(url + "/jobs")
            screenshot(small, "phone-jobs.png")

        return in_browser(scenario)


class CancelFromPageTests(LoopbackDaemon):
    delay = "60"  # staging takes long enough to cancel the job from its page

    def test_cancel_with_confirmation(self):
        """The cancel button of an active job asks first: dismissed, nothing happens; confirmed from the keyboard,
        the job is cancelled and the page shows it without a reload; an ended job has no cancel button."""
        url = self.daemon.url

        def scenario(browser):
            context, page = new_page(browser)
            (job_id,) = submit(context, url, [self.item("sample-001", "c", "run-c")])
            page.goto(f"{url}/jobs/{job_id}")
            button = page.get_by_role("button", name=f"Cancel job {job_id}")
            asked = []
            page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
            button.click()
            self.assertIn(job_id, asked[0])
            self.assertIn(job_state(context, url, job_id), jobs.ACTIVE)
            page.once("dialog", lambda dialog: dialog.accept())
            button.focus()
            page.keyboard.press("Enter")
            page.locator("#job-head .badge", has_text=jobs.CANCELLED).first.wait_for()
            self.assertEqual(page.locator("#notice").inner_text(), f"Job {job_id} cancelled.")
            self.assertEqual(job_state(context, url, job_id), jobs.CANCELLED)
            self.assertEqual(page.locator("button[data-cancel]").count(), 0)
            self.assertEqual(page.locator("#timeline li").last.locator(".badge").last.inner_text(), jobs.CANCELLED)

        return in_browser(scenario)


class CertificateDashboardTests(ExposedDaemonTestCase):
    """Over HTTPS with client certificates: two users and an admin, each in a browser of their own."""

    timeout = 60

    def setUp(self):
        super().setUp()
        credentials = os.path.join(self.workdir, "credentials")
        self.operator = testx509.make_user(self.creds.ca, "Olga Operator", key_kind="ec")
        self.creds.files["bob"] = testx509.write_credentials(os.path.join(credentials, "bob-user"),
                                                             user=self.creds.bob)
        self.creds.files["operator"] = testx509.write_credentials(os.path.join(credentials, "operator"),
                                                                  user=self.operator)
        return self.start_transferd({"admins": dn(self.operator)})

    def test_each_user_sees_their_own_jobs_and_the_admin_all(self):
        """Alice and Bob each see only their own jobs (another's job page is refused); the admin sees both and
        may filter by submitter."""
        url = self.daemon.url

        def as_user(browser, who):
            files = self.creds.files[who]
            return new_page(browser, ignore_https_errors=True, client_certificates=[
                {"origin": url, "certPath": files.user_cert, "keyPath": files.user_key}])

        def scenario(browser):
            owned, pages = {}, {}
            for who in ("alice", "bob"):
                context, pages[who] = as_user(browser, who)
                owned[who] = set(submit(context, url, [
                    {"product_id": "sample-001",
                     "destination_path": "file://" + os.path.join(self.workdir, "deliveries", f"{who}-{n}")}
                    for n in range(2)]))
            for who, other in (("alice", "bob"), ("bob", "alice")):
                page = pages[who]
                page.goto(url + "/jobs")
                self.assertEqual(listed(page), owned[who])
                self.assertIn(f"Signed in as {dn(getattr(self.creds, who))}", page.locator(".who").inner_text())
                self.assertEqual(page.get_by_label("Submitter").count(), 0)
                page.goto(url + "/")
                self.assertEqual(sum(int(n) for n in page.locator("#states .count").all_inner_texts()), 2)
                response = page.goto(f"{url}/jobs/{sorted(owned[other])[0]}")
                self.assertEqual(response.status, 403)
                self.assertIn("submitted by someone else", page.locator(".refusal").inner_text())
                response = page.goto(url + "/jobs?submitter=" + dn(getattr(self.creds, other)))
                self.assertEqual(response.status, 403)
            _, admin = as_user(browser, "operator")
            admin.goto(url + "/jobs")
            self.assertEqual(listed(admin), owned["alice"] | owned["bob"])
            admin.get_by_label("Submitter").fill(dn(self.creds.alice))
            admin.get_by_role("button", name="Filter").click()
            admin.wait_for_url(re.compile("submitter="))
            self.assertEqual(listed(admin), owned["alice"])
            admin.goto(url + "/")
            self.assertEqual(sum(int(n) for n in admin.locator("#states .count").all_inner_texts()), 4)

        return in_browser(scenario)
