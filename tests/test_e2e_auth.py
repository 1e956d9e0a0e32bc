"""The real daemon exposed the way an operator would: TLS, client certificates and proxies, bearer tokens.

One twistd with [api] tls_cert, [auth] x509_ca_path (a grid CA directory
with a CRL), token_issuers (a JWKS file) and an admin; clients over real
HTTPS on loopback. Also: the daemon refuses to listen beyond loopback
without authentication.
"""

import datetime
import json
import os
import subprocess

import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests.daemon import TWISTD, Daemon, daemon_config, free_port
from tests.test_e2e_staging import StagerDaemon
from tests.support import wait_for
from transferd import jobs, sample
from transferd.testing import x509 as testx509
from transferd.testing.tokens import AUDIENCE, TokenIssuer
from transferd.tls import client_tls_policy

ISS = "https://iam.example.org/"
STAGER_HOST = "stager.test"


class Credentials:
    """A test CA (with a CRL revoking Mallory), the daemon's host certificate, users, proxies and a token issuer."""

    def __init__(self, directory):
        self.directory = directory
        self.ca = ca = testx509.make_ca(key_kind="ec")
        self.alice = testx509.make_user(ca, "Alice Example", key_kind="ec")
        self.bob = testx509.make_user(ca, "Bob Example", key_kind="ec")
        self.mallory = testx509.make_user(ca, "Mallory Example", key_kind="ec")
        self.ca_dir = testx509.write_ca_dir(os.path.join(directory, "certificates"), cas=[ca],
                                            crls=[testx509.make_crl(ca, revoked=[self.mallory])])
        self.paths = testx509.write_credentials(os.path.join(directory, "host"), ca=ca,
                                                host=testx509.make_host(ca, "localhost", key_kind="ec"))
        self.files = {
            "alice": testx509.write_credentials(os.path.join(directory, "alice"), user=self.alice),
            "bob-proxy": testx509.write_credentials(os.path.join(directory, "bob"),
                                                    proxy=testx509.make_proxy(self.bob, key_kind="ec")),
            "mallory": testx509.write_credentials(os.path.join(directory, "mallory"), user=self.mallory),
            "stager": testx509.write_credentials(os.path.join(directory, "stager"),
                                                 host=testx509.make_host(ca, STAGER_HOST, key_kind="ec")),
        }
        self.issuer = TokenIssuer(ISS, kind="ec")
        self.jwks = os.path.join(directory, "jwks.json")
        self.issuer.write_jwks(self.jwks)

    def client(self, who=None):
        """An HTTPS client trusting the test CA, presenting who's certificate or proxy (None: no certificate)."""
        if who is None:
            policy = client_tls_policy(self.paths.ca_cert)
        elif self.files[who].proxy:
            policy = client_tls_policy(self.paths.ca_cert, self.files[who].proxy)
        else:
            policy = client_tls_policy(self.paths.ca_cert, self.files[who].user_cert, self.files[who].user_key)
        return HTTPClient(Agent(reactor, contextFactory=policy, pool=HTTPConnectionPool(reactor, persistent=False)))


def dn(credential):
    return "/DC=org/DC=transferd-test/OU=Users/CN=" + credential.cert.subject.rfc4514_string().split("CN=")[1].split(",")[0]


class ExposedDaemonTestCase(unittest.TestCase):
    """Starts one transferd with TLS and the given [auth] settings (plus any other sections)."""

    timeout = 90

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.workdir, "deliveries"))
        sample.create(os.path.join(self.workdir, "archive"))
        self.creds = Credentials(os.path.join(self.workdir, "credentials"))
        self.audit = os.path.join(self.workdir, "audit.log")

    @defer.inlineCallbacks
    def start_transferd(self, auth, **sections):
        port = free_port()
        config = daemon_config(
            self.workdir, port,
            api={"public_url": f"https://localhost:{port}", "tls_cert": self.creds.paths.host_cert,
                 "tls_key": self.creds.paths.host_key},
            auth={"x509_ca_path": self.creds.ca_dir, "audit_log": self.audit, **auth},
            **sections,
        )
        self.daemon = Daemon(self.workdir, config, port)
        self.daemon.url = f"https://localhost:{port}"
        self.daemon.start = self.start_tls
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)

    @defer.inlineCallbacks
    def start_tls(self, timeout=30):
        """Daemon.start, waiting for the answer over HTTPS (an unauthenticated request gets 401 once it is up)."""
        daemon = self.daemon
        daemon.starts += 1
        daemon.process = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", daemon.logfile, "transferd", "--config", daemon.config_path],
            cwd=daemon.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(daemon.logfile + ".stderr", "w"),
        )

        @defer.inlineCallbacks
        def answers():
            if daemon.process.poll() is not None:
                raise AssertionError(f"transferd exited with {daemon.process.returncode}:\n{daemon.logs()[-3000:]}")
            try:
                code, _ = yield self.call("alice", "GET", "/transferStatus?job_id=" + jobs.new_job_id())
                return code == 404
            except Exception:
                return False

        yield wait_for(answers, timeout, interval=0.1)

    @defer.inlineCallbacks
    def call(self, who, method, path, token=None, **kwargs):
        """(status, JSON body) of a request as who (a certificate name or None), with an optional bearer token."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = yield self.creds.client(who).request(method, self.daemon.url + path, headers=headers,
                                                        timeout=10, **kwargs)
        return response.code, json.loads((yield response.content()))

    @defer.inlineCallbacks
    def submit(self, who, token=None):
        destination = "file://" + os.path.join(self.workdir, "deliveries", jobs.new_job_id())
        code, data = yield self.call(who, "POST", "/submitTransfer", token=token,
                                     data={"product_id": "sample-001", "destination_path": destination})
        self.assertEqual(code, 202, data)
        return data["job_id"]


    @defer.inlineCallbacks
    def daemon_wait(self, owners):
        """Every job's final view, each read by its owner."""
        views = {}

        @defer.inlineCallbacks
        def done():
            for job_id, (who, token) in owners.items():
                _, views[job_id] = yield self.call(who, "GET", f"/transferStatus?job_id={job_id}", token=token)
            return all(view["status"] in jobs.TERMINAL for view in views.values())

        yield wait_for(done, 30, interval=0.2)
        return list(views.values())


class ExposedDaemonTests(ExposedDaemonTestCase):
    """Certificates, proxies and tokens accepted; an admin by token."""

    def setUp(self):
        super().setUp()
        return self.start_transferd({"token_audiences": AUDIENCE, "token_issuers": f"{ISS} {self.creds.jwks}",
                                     "admins": f"SUB=operator, ISS={ISS}"})

    @defer.inlineCallbacks
    def test_identities_and_authorization(self):
        """Certificate, proxy and token users each own their jobs; others get 403; the admin sees all; all audited."""
        alice_job = yield self.submit("alice")
        bob_job = yield self.submit("bob-proxy")
        carol_token = self.creds.issuer.token(sub="carol")
        carol_job = yield self.submit(None, token=carol_token)
        expected = {alice_job: dn(self.creds.alice), bob_job: dn(self.creds.bob), carol_job: f"SUB=carol, ISS={ISS}"}
        owners = {alice_job: ("alice", None), bob_job: ("bob-proxy", None), carol_job: (None, carol_token)}
        for job_id, (who, token) in owners.items():
            code, view = yield self.call(who, "GET", f"/transferStatus?job_id={job_id}", token=token)
            self.assertEqual((code, view["submitter"]), (200, expected[job_id]))
        # The proxy's DN is the user's: the proxy's own CN never shows.
        self.assertEqual(expected[bob_job], "/DC=org/DC=transferd-test/OU=Users/CN=Bob Example")
        code, data = yield self.call("bob-proxy", "GET", f"/transferStatus?job_id={alice_job}")
        self.assertEqual(code, 403, data)
        code, data = yield self.call("alice", "POST", "/cancelTransfer", data={"job_id": carol_job})
        self.assertEqual(code, 403, data)
        code, data = yield self.call(None, "GET", f"/transferStatus?job_id={alice_job}")
        self.assertEqual(code, 401, data)
        admin = self.creds.issuer.token(sub="operator")
        code, view = yield self.call(None, "GET", f"/transferStatus?job_id={alice_job}", token=admin)
        self.assertEqual(code, 200, view)
        views = yield self.daemon_wait(owners)
        self.assertEqual({view["status"] for view in views}, {jobs.SUCCESS})
        with open(self.audit) as handle:
            records = [json.loads(line) for line in handle]
        self.assertEqual([(r["action"], r["outcome"], r["identity"]) for r in records if r["action"] == "submit"],
                         [("submit", 202, expected[job]) for job in (alice_job, bob_job, carol_job)])
        refused = [(r["action"], r["outcome"]) for r in records if r["outcome"] in (401, 403)]
        self.assertEqual(refused, [("transferStatus", 403), ("cancel", 403), ("transferStatus", 401)])
        self.assertTrue(all(r["peer"] == "127.0.0.1" for r in records))

    @defer.inlineCallbacks
    def test_revoked_certificate_refused_at_handshake(self):
        """A revoked certificate never gets an HTTP answer: the TLS handshake fails."""
        with self.assertRaises(Exception):
            yield self.call("mallory", "GET", f"/transferStatus?job_id={jobs.new_job_id()}")
        self.assertIn("revoked", self.daemon.logs())

    @defer.inlineCallbacks
    def test_plain_http_refused(self):
        """The API speaks only TLS: a plain HTTP request gets no answer."""
        with self.assertRaises(Exception):
            response = yield treq.get(f"http://127.0.0.1:{self.daemon.port}/transferStatus?job_id=x",
                                      timeout=5, persistent=False)
            yield response.content()


class StagerCertificateTests(ExposedDaemonTestCase):
    """[auth] stager_dns: /doneStaging needs the stager's certificate as well as the job's authcode."""

    @defer.inlineCallbacks
    def test_only_the_stager_reports(self):
        """The reference stager, presenting its certificate, reports; the job's owner cannot report for it."""
        paths = self.creds.files["stager"]
        stager = StagerDaemon(self.workdir, free_port(), "--callback-ca", self.creds.paths.ca_cert,
                              "--callback-cert", paths.host_cert, "--callback-key", paths.host_key)
        self.addCleanup(stager.stop)
        yield stager.start()
        yield self.start_transferd(
            {"stager_dns": f"/DC=org/DC=transferd-test/CN={STAGER_HOST}"},
            stager={"backend": "callback", "url": stager.url + "/stage", "timeout": "20", "retry_delay": "0.2"},
        )
        job_id = yield self.submit("alice")
        code, data = yield self.call("alice", "POST", "/doneStaging", data={
            "job_id": job_id, "product_id": "sample-001", "authcode": "0" * 32, "success": "true",
            "staged_to": "elsewhere.test", "path": "/etc"})
        self.assertEqual(code, 403, data)
        self.assertIn("configured stagers", data["msg"])
        views = yield self.daemon_wait({job_id: ("alice", None)})
        self.assertEqual(views[0]["status"], jobs.SUCCESS, views)
        self.assertEqual(views[0]["stager_hostname"], STAGER_HOST)


class VOMSTests(ExposedDaemonTestCase):
    """[auth] voms_dir and an FQAN in admins: VOMS proxies over real TLS, believed only when their AC is good."""

    def setUp(self):
        super().setUp()
        creds, ca = self.creds, self.creds.ca
        voms = testx509.make_voms_server(ca, "voms.meerkat.test", key_kind="ec")
        stranger = testx509.make_voms_server(ca, "voms.stranger.test", key_kind="ec")
        vomsdir = testx509.write_voms_dir(os.path.join(creds.directory, "vomsdir"), {"meerkat": [voms]})
        production = ["/meerkat/Role=production/Capability=NULL"]
        proxies = {
            "valid": testx509.make_voms_proxy(creds.bob, voms, "meerkat", production, key_kind="ec"),
            "member": testx509.make_voms_proxy(creds.bob, voms, "meerkat", ["/meerkat/Role=NULL/Capability=NULL"],
                                               key_kind="ec"),
            "expired": testx509.make_voms_proxy(
                creds.bob, voms, "meerkat", production, key_kind="ec", ac_lifetime_seconds=60,
                ac_now=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)),
            "forged": testx509.make_voms_proxy(creds.bob, voms, "meerkat", production, key_kind="ec",
                                               signer_key=stranger.key),
            "untrusted": testx509.make_voms_proxy(creds.bob, stranger, "meerkat", production, key_kind="ec"),
        }
        for name, proxy in proxies.items():
            creds.files[name] = testx509.write_credentials(os.path.join(creds.directory, name), proxy=proxy)
        return self.start_transferd({"voms_dir": vomsdir, "admins": "/meerkat/Role=production"})

    @defer.inlineCallbacks
    def test_fqan_admin(self):
        """Only a proxy with a good production AC sees Alice's job; expired, forged and untrusted ACs get 403."""
        job_id = yield self.submit("alice")
        code, view = yield self.call("valid", "GET", f"/transferStatus?job_id={job_id}")
        self.assertEqual(code, 200, view)
        self.assertEqual(view["submitter"], dn(self.creds.alice))
        for who in ("member", "expired", "forged", "untrusted"):
            code, data = yield self.call(who, "GET", f"/transferStatus?job_id={job_id}")
            self.assertEqual(code, 403, (who, data))
        # Whatever its AC, the proxy still authenticates Bob: his own job is his.
        bob_job = yield self.submit("forged")
        code, view = yield self.call("expired", "GET", f"/transferStatus?job_id={bob_job}")
        self.assertEqual((code, view["submitter"]), (200, dn(self.creds.bob)))
        logs = self.daemon.logs()
        for reason in ("does not include now", "signature does not verify", "not a VOMS server configured"):
            self.assertIn(reason, logs)


class SecureByDefaultTests(unittest.TestCase):
    def run_daemon(self, **overrides):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "archive"))
        config = daemon_config(workdir, free_port(), **overrides)
        return subprocess.run([TWISTD, "--pidfile=", "-n", "--logfile", "-", "transferd", "--config", config],
                              cwd=workdir, capture_output=True, text=True, timeout=60)

    def test_refuses_every_interface_without_authentication(self):
        """Asked to listen on 0.0.0.0 with no [auth], the daemon exits 1 and says how to configure it."""
        result = self.run_daemon(api={"endpoint": f"tcp:{free_port()}:interface=0.0.0.0"})
        self.assertEqual(result.returncode, 1)
        output = result.stdout + result.stderr
        self.assertIn("refusing to listen on", output)
        self.assertIn("[auth] x509_ca_path", output)
        self.assertIn("interface=127.0.0.1", output)

    def test_refuses_without_interface(self):
        """An endpoint without interface= means every interface: refused the same way."""
        result = self.run_daemon(api={"endpoint": f"tcp:{free_port()}"})
        self.assertEqual(result.returncode, 1)
        self.assertIn("refusing to listen on", result.stdout + result.stderr)
