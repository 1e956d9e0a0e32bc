"""Events: webhooks to a real receiver on loopback that fails its first answers, and what the outbox keeps.

Signatures are checked here with hashlib and hmac directly, not with
transferd's own signing code, so a mistake in one is not repeated in the
other.
"""

import base64
import hashlib
import hmac
import json
import os
import time
from datetime import datetime

from prometheus_client import generate_latest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import server

from tests.harness import Harness
from tests.support import wait_for
from transferd import jobs
from transferd.config import ConfigError, load_config
from transferd.testing.webhooks import WebhookReceiver

ALL_STATES = ",".join(jobs.STATES)


def write_secret(path, *keys):
    with open(path, "w") as handle:
        for key in keys:
            handle.write("whsec_" + base64.b64encode(key).decode() + "\n")
    return path


def verify(record, key, tolerance=300):
    """A receiver's check (Standard Webhooks, symmetric): one v1 signature of "id.timestamp.body" matches."""
    headers = record.headers
    message_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    assert "." not in message_id
    assert abs(int(timestamp) - reactor.seconds()) < tolerance
    expected = hmac.new(key, f"{message_id}.{timestamp}.".encode() + record.body, hashlib.sha256).digest()
    for item in headers["webhook-signature"].split(" "):
        version, _, value = item.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(value), expected):
            return json.loads(record.body)
    raise AssertionError(f"no valid signature on {message_id}")


def metrics_text(harness):
    return generate_latest(harness.daemon.metrics.registry).decode()


class ReceiverMixin:
    @defer.inlineCallbacks
    def start_receiver(self, **options):
        receiver = WebhookReceiver(**options)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(receiver))
        self.addCleanup(port.stopListening)
        return receiver, f"http://127.0.0.1:{port.getHost().port}"


class WebhookTests(ReceiverMixin, unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.ops_key, self.all_key, self.master_key = os.urandom(32), os.urandom(32), os.urandom(32)
        self.receiver, self.receiver_url = yield self.start_receiver(fail_first=2)

    def build(self, settings=None):
        secrets = {name: write_secret(os.path.join(self.base, f"{name}.secret"), key)
                   for name, key in (("ops", self.ops_key), ("all", self.all_key), ("master", self.master_key))}
        values = {
            ("events", "subscribers"): f"ops {self.receiver_url}/ops {secrets['ops']}\n"
                                       f"all {self.receiver_url}/all {secrets['all']} {ALL_STATES}",
            ("events", "notify_secret_file"): secrets["master"],
            ("events", "retry_delay"): "0.02",
            ("events", "max_retry_delay"): "0.1",
            ("events", "sweep_interval"): "3600",  # only the wake-up after each commit sends: no polling
            ("transfer", "allowed_hosts"): "127.0.0.1",  # per-job webhooks may call the loopback receiver
        }
        values.update(settings or {})
        self.values = values
        harness = Harness(os.path.join(self.base, "daemon"), values)
        self.addCleanup(harness.close)
        self.harness = harness
        return harness

    @defer.inlineCallbacks
    def submit(self, items):
        response, body = yield self.harness.request(
            "POST", "/api/v1/jobs", data=json.dumps({"jobs": items}).encode(),
            headers={"Content-Type": "application/json"})
        answer = json.loads(body)
        self.assertEqual(response.code, 200, answer)
        return answer

    @defer.inlineCallbacks
    def test_success_heard_within_a_second_on_an_idle_daemon(self):
        """With no sweep for an hour, the commit of SUCCESS itself wakes the dispatcher: the webhook arrives within
        a second of the transition's time."""
        self.receiver, self.receiver_url = yield self.start_receiver()
        harness = self.build()
        yield harness.start()
        answer = yield self.submit([{"product_id": "sample-001", "destination_path": harness.destination}])
        job_id = answer["results"][0]["job_id"]
        while True:
            received = yield self.receiver.arrived.get()
            heard = time.time()
            data = json.loads(received.body)["data"]
            if received.path == "/ops" and data["job_id"] == job_id and data["state"] == jobs.SUCCESS:
                break
        moment = datetime.fromisoformat(data["time"].replace("Z", "+00:00")).timestamp()
        self.assertLess(heard - moment, 1.0)

    @defer.inlineCallbacks
    def test_every_state_change_delivered_once_signed_in_order(self):
        """Through a receiver that fails each event's first two answers, every terminal state reaches each
        target exactly once after de-duplication by webhook-id, correctly signed, in order per job."""
        harness = self.build()
        yield harness.start()
        _, body = yield harness.request("GET", "/api/v1/whoami")
        notify_key = base64.b64decode(json.loads(body)["webhook_secret"][len("whsec_"):])
        items = [{"product_id": "sample-001", "destination_path": f"{harness.destination}/{n}",
                  "notify_url": f"{self.receiver_url}/mine?token=abc"} for n in range(3)]
        items.append({"product_id": "sample-dir", "destination_path": harness.destination + "/dir"})
        answer = yield self.submit(items)
        job_ids = [result["job_id"] for result in answer["results"]]

        def delivered():  # every event each target wants answered 200 at last: 3 + 4 + 4 * 5
            return len([r for r in self.receiver.received if r.answered == 200]) == 27

        @defer.inlineCallbacks
        def recorded():  # the receiver counts a 200 before the daemon has read it and written it down
            for job_id in job_ids:
                rows = yield harness.daemon.events.outbox.deliveries(job_id)
                if {row["status"] for row in rows} != {"delivered"}:
                    return False
            return True

        yield wait_for(delivered, timeout=30)
        yield wait_for(recorded, timeout=10)
        keys = {"/ops": self.ops_key, "/all": self.all_key, "/mine": notify_key}
        kept = self.receiver.unique()
        bodies = {path: [verify(record, keys[path]) for record in kept if record.path == path] for path in keys}
        terminal = {path: sorted(b["data"]["job_id"] for b in found if b["data"]["state"] in jobs.TERMINAL)
                    for path, found in bodies.items()}
        self.assertEqual(terminal, {"/ops": sorted(job_ids), "/all": sorted(job_ids), "/mine": sorted(job_ids[:3])})
        for job_id in job_ids:  # the subscriber of every state saw each job's history, in order, once
            states = [b["data"]["state"] for b in bodies["/all"] if b["data"]["job_id"] == job_id]
            self.assertEqual(states, [jobs.SUBMITTED, jobs.STAGING, jobs.STAGED, jobs.TRANSFERRING, jobs.SUCCESS])
        first = next(body for body in bodies["/mine"] if body["data"]["job_id"] == job_ids[0])
        self.assertEqual((first["type"], first["data"]["product_id"], first["data"]["previous_state"],
                          first["data"]["destination_path"]),
                         ("job.success", "sample-001", jobs.TRANSFERRING, items[0]["destination_path"]))
        self.assertEqual(len(kept), 27)
        answers = [(r.path, r.headers["webhook-id"], r.answered) for r in self.receiver.received]
        self.assertEqual(sorted(answers), sorted((r.path, r.headers["webhook-id"], status) for r in kept
                                                 for status in (503, 503, 200)))  # two failures, then delivered
        text = metrics_text(harness)
        self.assertIn('transferd_event_deliveries_total{outcome="delivered",target="ops"} 4.0', text)
        self.assertIn('transferd_event_deliveries_total{outcome="retried",target="ops"} 8.0', text)

    @defer.inlineCallbacks
    def test_given_up_after_max_attempts(self):
        """A receiver that never accepts gets max_attempts tries; then the event is given up, and counted."""
        harness = self.build({("events", "max_attempts"): "3", ("events", "subscribers"): ""})
        receiver, url = yield self.start_receiver(fail_first=10**6, fail_status=500)
        yield harness.start()
        answer = yield self.submit([{"product_id": "sample-001", "destination_path": harness.destination + "/x",
                                     "notify_url": f"{url}/hook"}])
        job_id = answer["results"][0]["job_id"]

        @defer.inlineCallbacks
        def given_up():
            rows = yield harness.daemon.events.outbox.deliveries(job_id)
            return rows and all(row["status"] == "given_up" for row in rows)

        yield wait_for(given_up, timeout=20)
        self.assertEqual(len(receiver.received), 3)
        rows = yield harness.daemon.events.outbox.deliveries(job_id)
        self.assertEqual((rows[0]["attempts"], rows[0]["last_error"]), (3, "127.0.0.1 answered 500 Internal Server Error"))
        self.assertIn('transferd_events_given_up_total{target="notify"} 1.0', metrics_text(harness))

    @defer.inlineCallbacks
    def test_notify_url_refused(self):
        """A notify_url that is not http(s), names an internal address, or comes when none are sent is refused
        (400) and nothing is stored."""
        harness = self.build({("transfer", "allowed_hosts"): ""})
        yield harness.start()
        for url, words in (("ftp://example.org/x", "http:// or https://"),
                           ("http://127.0.0.1:9/x", "internal address"),
                           ("http://[::1]/x", "internal address"),
                           ("http://0x7f.1/x", "not a valid host name or IP address"),  # 127.0.0.1 to many clients
                           ("http://user:pw@example.org/x", "user information"),
                           (17, "http:// or https://")):
            response, body = yield harness.request(
                "POST", "/api/v1/jobs", data=json.dumps({"jobs": [
                    {"product_id": "sample-001", "destination_path": harness.destination, "notify_url": url}]}).encode(),
                headers={"Content-Type": "application/json"})
            result = json.loads(body)["results"][0]
            self.assertEqual(result["error"]["status"], 400, url)
            self.assertIn(words, result["error"]["detail"])
            response, body = yield harness.request(
                "POST", "/submitTransfer", data={"product_id": "sample-001", "destination_path": harness.destination,
                                                 "notify_url": str(url)})
            self.assertEqual((response.code, json.loads(body)["error"]), (400, True))
        listed = yield harness.store.list_jobs(jobs.JobFilter(), 10)
        self.assertEqual(listed, [])

    @defer.inlineCallbacks
    def test_legacy_form_field(self):
        """/submitTransfer takes notify_url as a form field; its answer is the prototype's; the webhook arrives."""
        yield self.build().start()
        response, body = yield self.harness.request(
            "POST", "/submitTransfer", data={"product_id": "sample-001", "destination_path": self.harness.destination,
                                             "notify_url": self.receiver_url + "/legacy"})
        answer = json.loads(body)
        self.assertEqual((response.code, sorted(answer)), (202, ["error", "job_id", "msg"]))
        yield wait_for(lambda: any(r.path == "/legacy" and r.answered == 200 for r in self.receiver.received),
                       timeout=20)
        record = next(r for r in self.receiver.received if r.path == "/legacy")
        self.assertEqual(json.loads(record.body)["data"]["job_id"], answer["job_id"])
        response, body = yield self.harness.request("GET", "/transferStatus?job_id=" + answer["job_id"])
        self.assertNotIn("notify_url", json.loads(body))  # the prototype's view is unchanged

    @defer.inlineCallbacks
    def test_reconfigure_swaps_subscribers(self):
        """reconfigure() with a new subscriber list sends to the new one only; a bad secret file changes nothing."""
        harness = self.build()
        yield harness.start()
        dispatcher = harness.daemon.events
        other_key = os.urandom(32)
        other = write_secret(os.path.join(self.base, "other.secret"), other_key)
        broken = os.path.join(self.base, "broken.secret")
        with open(broken, "w") as handle:
            handle.write("not a secret\n")
        values = {("events", "subscribers"): f"other {self.receiver_url}/other {broken}"}
        with self.assertRaises(ConfigError):
            dispatcher.reconfigure(load_config(None, {**self.values, **values}, check_files=False))
        self.assertEqual(sorted(dispatcher.settings.subscribers), ["all", "ops"])
        values = {("events", "subscribers"): f"other {self.receiver_url}/other {other}"}
        dispatcher.reconfigure(load_config(None, {**self.values, **values}, check_files=False))
        self.assertEqual(sorted(dispatcher.settings.subscribers), ["other"])
        yield self.submit([{"product_id": "sample-001", "destination_path": harness.destination + "/r"}])
        yield wait_for(lambda: any(r.path == "/other" and r.answered == 200 for r in self.receiver.received),
                       timeout=20)
        self.assertEqual({r.path for r in self.receiver.received}, {"/other"})
        verify(next(r for r in self.receiver.received if r.path == "/other"), other_key)
