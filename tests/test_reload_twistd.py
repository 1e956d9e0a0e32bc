"""SIGHUP on the real twistd: the configuration file is read again and its reloadable settings apply at once;
a broken file changes nothing; a changed restart-only key is named in the log; [log] level follows.
The reference stager (twistd transferd-stager --config) does the same for its own options.
"""

import json
import os
import signal
import subprocess

import treq
from twisted.internet import defer
from twisted.trial import unittest

from tests.daemon import TWISTD, Daemon, daemon_config, free_port, write_config
from tests.support import wait_for
from transferd.testing.tokens import AUDIENCE, TokenIssuer

ISS = "https://idp.example.org"
BOB = f"SUB=bob, ISS={ISS}"


class AuthDaemon(Daemon):
    """A daemon that authenticates: it is up once it refuses an anonymous client."""

    @defer.inlineCallbacks
    def _answers(self):
        if self.process.poll() is not None:
            raise AssertionError(f"transferd exited with {self.process.returncode}:\n{self.logs()[-3000:]}")
        try:
            response = yield treq.get(self.url + "/api/v1/whoami", timeout=2, persistent=False)
            yield response.content()
            return response.code == 401
        except Exception:
            return False


class ReloadTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        for name in ("archive", "staging", "deliveries"):
            os.makedirs(os.path.join(self.workdir, name))
        with open(os.path.join(self.workdir, "archive", "product-1"), "wb") as handle:
            handle.write(b"x" * 1000)
        self.issuer = TokenIssuer(ISS, kind="ec")
        self.jwks = os.path.join(self.workdir, "jwks.json")
        self.issuer.write_jwks(self.jwks)
        self.port = free_port()
        self.auth = {"token_issuers": f"{ISS} {self.jwks}", "token_audiences": AUDIENCE}
        self.path = self.configure()
        self.daemon = AuthDaemon(self.workdir, self.path, self.port)
        self.addCleanup(self.daemon.stop)
        return self.daemon.start()

    def configure(self, auth=None, **sections):
        """(Re)write the daemon's configuration file: the token set-up, auth, and other sections."""
        return daemon_config(self.workdir, self.port, auth={**self.auth, **(auth or {})}, **sections)

    def call(self, who, method, path, **kwargs):
        headers = {"Authorization": "Bearer " + self.issuer.token(sub=who)}
        return treq.request(method, self.daemon.url + path, headers=headers, timeout=10, persistent=False, **kwargs)

    @defer.inlineCallbacks
    def reload(self, expect):
        """SIGHUP, then wait for the line saying how it went (expect: text of that line)."""
        seen = self.daemon.logs().count(expect)
        self.daemon.process.send_signal(signal.SIGHUP)
        yield wait_for(lambda: self.daemon.logs().count(expect) > seen, 10)

    @defer.inlineCallbacks
    def code(self, who, method, path):
        response = yield self.call(who, method, path)
        yield response.content()
        return response.code

    @defer.inlineCallbacks
    def read_as_bob(self, job_id):
        response = yield self.call("bob", "GET", f"/api/v1/jobs/{job_id}")
        yield response.content()
        return response.code

    @defer.inlineCallbacks
    def test_admin_added_broken_file_restart_key(self):
        """An admin added at run time reads others' jobs at once; a broken file, or one failing its checks,
        changes nothing and says why in one line; a restart-only key is named in the log."""
        response = yield self.call("alice", "POST", "/api/v1/jobs", json={
            "jobs": [{"product_id": "product-1", "destination_path": "file://" + self.workdir + "/deliveries"}]})
        answer = yield response.json()
        self.assertEqual((response.code, answer["accepted"]), (200, 1), answer)
        job_id = answer["results"][0]["job_id"]
        self.assertEqual((yield self.read_as_bob(job_id)), 403)
        self.assertEqual((yield self.code("bob", "GET", "/api/v1/daemons")), 403)
        self.assertEqual((yield self.code("bob", "PUT", "/api/v1/daemons/localhost/drain")), 403)

        self.configure({"admins": BOB})
        yield self.reload("configuration reloaded: [auth] admins")
        self.assertEqual((yield self.read_as_bob(job_id)), 200)
        self.assertEqual((yield self.code("bob", "GET", "/api/v1/daemons")), 200)
        self.assertEqual((yield self.code("alice", "GET", "/api/v1/daemons")), 403)

        with open(self.path, "a") as handle:
            handle.write("[auth\nadmins = \n")  # not INI any more
        yield self.reload("configuration not reloaded, nothing changed: configuration file")
        self.assertEqual((yield self.read_as_bob(job_id)), 200)

        self.configure({"admins": ""}, api={"max_batch": "0"})  # bob removed, but the file fails its checks
        yield self.reload("configuration not reloaded, nothing changed: bad value for [api] max_batch")
        self.assertEqual((yield self.read_as_bob(job_id)), 200)

        self.configure({"admins": BOB}, reconciler={"interval": "5", "lease": "2"})
        yield self.reload("[reconciler] interval changed in the configuration file: restart transferd to apply it")
        logs = self.daemon.logs()
        self.assertNotIn("Traceback", logs)
        self.assertEqual(logs.count("not reloaded"), 2)
        self.assertEqual((yield self.read_as_bob(job_id)), 200)

        self.configure({"admins": ""})  # the reloadable part of a file applies, the restart-only part is named
        yield self.reload("configuration reloaded: [auth] admins")
        self.assertEqual((yield self.read_as_bob(job_id)), 403)

    @defer.inlineCallbacks
    def test_log_level(self):
        """[log] level = warn drops the info lines (the access log's) from the reload on; info brings them back."""
        self.configure(log={"level": "warn"}, reconciler={"interval": "5", "lease": "2"})
        yield self.reload("[reconciler] interval changed")  # a warning: still shown, and the level applies with it
        response = yield self.call("alice", "GET", "/api/v1/whoami?quiet=1")
        yield response.content()
        self.configure(log={"level": "info"})
        yield self.reload("configuration reloaded: [log] level")
        response = yield self.call("alice", "GET", "/api/v1/whoami?loud=1")
        yield response.content()
        yield wait_for(lambda: "whoami?loud=1" in self.daemon.logs(), 10)
        self.assertNotIn("whoami?quiet=1", self.daemon.logs())


class StagerReloadTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        for name in ("archive", "staging"):
            os.makedirs(os.path.join(self.workdir, name))
        with open(os.path.join(self.workdir, "archive", "product-1"), "wb") as handle:
            handle.write(b"y" * 100)
        self.port = free_port()
        self.path = os.path.join(self.workdir, "stager.ini")
        self.write()
        self.logfile = os.path.join(self.workdir, "stager.log")
        self.process = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", self.logfile, "transferd-stager", "--config", self.path,
             "--endpoint", f"tcp:{self.port}:interface=127.0.0.1"],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(self.stop)
        return wait_for(lambda: "transferd-stager started" in self.logs(), 20)

    def stop(self):
        self.process.terminate()
        self.process.wait(20)

    def write(self, **options):
        values = {"archive": os.path.join(self.workdir, "archive"), "staging": os.path.join(self.workdir, "staging"),
                  **options}
        write_config(self.path, {"transferd-stager": values})

    def logs(self):
        if not os.path.exists(self.logfile):
            return ""
        with open(self.logfile, errors="replace") as handle:
            return handle.read()

    @defer.inlineCallbacks
    def reload(self, expect):
        seen = self.logs().count(expect)
        self.process.send_signal(signal.SIGHUP)
        yield wait_for(lambda: self.logs().count(expect) > seen, 10)

    @defer.inlineCallbacks
    def test_reload(self):
        """SIGHUP applies the reloadable options of --config (a new archive), names the others, refuses a broken file."""
        other = os.path.join(self.workdir, "other-archive")
        os.makedirs(other)
        self.write(archive=other, staging=os.path.join(self.workdir, "elsewhere"), delay="0.5")
        yield self.reload("options reloaded: --archive, --delay")
        self.assertIn("--staging changed: restart transferd-stager to apply it", self.logs())
        self.write(archive=os.path.join(self.workdir, "no-such-archive"))
        yield self.reload("options not reloaded, nothing changed: --archive")
        with open(self.path, "w") as handle:
            handle.write("[transferd-stager]\nbogus = 1\n")
        yield self.reload("options not reloaded, nothing changed: --config")
        self.assertNotIn("Traceback", self.logs())
        # It stages from the archive the first reload gave it: product-2 is there, product-1 is not.
        with open(os.path.join(other, "product-2"), "wb") as handle:
            handle.write(b"z" * 10)
        reports = yield self.receiver()
        for number, product in enumerate(("product-1", "product-2"), 1):
            body = json.dumps({"job_id": f"00000000-0000-4000-8000-00000000000{number}", "product_id": product,
                               "callback_url": self.callback_url, "authcode": "a" * 8})
            response = yield treq.post(f"http://127.0.0.1:{self.port}/stage", data=body.encode(),
                                       headers={"Content-Type": "application/json"}, timeout=5, persistent=False)
            yield response.content()
            self.assertEqual(response.code, 202)
        yield wait_for(lambda: len(reports) == 2, 10)
        outcome = {report["product_id"]: report["success"] for report in reports}
        self.assertEqual(outcome, {"product-1": False, "product-2": True})

    @defer.inlineCallbacks
    def receiver(self):
        """A transferd stand-in for the callbacks: the reports it receives (it answers 200)."""
        from twisted.internet import endpoints, reactor
        from twisted.web import resource, server

        reports = []

        class Done(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                reports.append(json.loads(request.content.read()))
                return b"{}"

        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(Done()))
        self.addCleanup(port.stopListening)
        self.callback_url = f"http://127.0.0.1:{port.getHost().port}/doneStaging"
        return reports
