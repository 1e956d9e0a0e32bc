"""The official FTS3 client (PyPI `fts3`, CERN's own CLI) against our fake FTS3, over real HTTP(S).

If the fake answers the real client's requests the way the client expects,
the fake speaks FTS3's protocol and not only our own client's idea of it.
The CLI runs as a subprocess from the venv that runs the tests; the fake
runs in this process, so the tests can look at what it received.

The client installs with `pip install fts3` once Debian's `swig` and
`libssl-dev` are present (its M2Crypto dependency builds from source);
scripts/test.sh does both. A missing client fails these tests, never skips
them.
"""

import json
import os
import re
import sys
import uuid

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from transferd.fts.client import deterministic_job_id
from transferd.fts.delegation import check_delegated_proxy
from transferd.testing import x509 as testx509
from transferd.testing.fakefts import FakeFTSServer, server_tls_options

BIN = os.path.dirname(sys.executable)
SUBMIT = os.path.join(BIN, "fts-rest-transfer-submit")
STATUS = os.path.join(BIN, "fts-rest-transfer-status")
TOKEN = "official-client-token"
VO = "transferd"
CLI_TIMEOUT = 60.0  # the CLI's own HTTP timeouts are 30 s

JOB_ID_LINE = re.compile(r"^Job id: (\S+)$", re.MULTILINE)


class _Collect(protocol.ProcessProtocol):
    def __init__(self):
        self.out, self.err = [], []
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class OfficialClientTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        missing = [path for path in (SUBMIT, STATUS) if not os.access(path, os.X_OK)]
        if missing:
            self.fail(
                "the official FTS3 client is not installed in this venv (missing "
                + ", ".join(missing)
                + "): apt-get install swig libssl-dev, then pip install fts3 (scripts/test.sh does both)"
            )
        self.home = os.path.abspath(self.mktemp())  # no ~/.fts3client.cfg can steer the CLI
        os.makedirs(self.home)

    async def start_fake(self, tls_options=None, **options):
        self.server = FakeFTSServer(reactor, tls_options=tls_options, **options)
        await self.server.start()
        self.addCleanup(self.server.stop)
        self.fake = self.server.fake
        return self.server.url

    async def cli(self, program, *args, expect=0):
        """Run one CLI command to its end: (stdout, stderr). Fails when its exit code is not expect."""
        # A bare environment: no proxy variables, no X509_* variables, no CA bundle overrides.
        env = {"HOME": self.home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
        collect = _Collect()
        transport = reactor.spawnProcess(collect, program, [program, *args], env=env, path=self.home)
        killer = reactor.callLater(CLI_TIMEOUT, transport.signalProcess, "KILL")
        code = await collect.ended
        timed_out = not killer.active()
        if not timed_out:
            killer.cancel()
        out, err = b"".join(collect.out).decode(), b"".join(collect.err).decode()
        command = " ".join([os.path.basename(program), *args])
        if timed_out:
            self.fail(f"{command} ran for over {CLI_TIMEOUT}s\nstdout:\n{out}\nstderr:\n{err}")
        if code != expect:
            self.fail(f"{command} exited {code}, not {expect}\nstdout:\n{out}\nstderr:\n{err}")
        return out, err

    def job_id(self, out):
        match = JOB_ID_LINE.search(out)
        self.assertIsNotNone(match, f"no 'Job id:' line in {out!r}")
        return match.group(1)

    async def wait_job(self, job_id, states=("FINISHED", "FAILED", "FINISHEDDIRTY", "CANCELED")):
        for _ in range(200):
            if self.fake.jobs[job_id]["job_state"] in states:
                return self.fake.jobs[job_id]
            await task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"job {job_id} still {self.fake.jobs[job_id]['job_state']} after 10 s")


class TokenModeTests(OfficialClientTestCase):
    """`fts-rest-transfer-submit -s URL --access-token TOKEN SRC DST`, then `fts-rest-transfer-status`."""

    SOURCE = "https://archive.example.org:8443/staged/sample-001"
    DESTINATION = "davs://storage.example.org:2880/deliveries/sample-001"

    async def test_submit_then_status(self):
        """When the official CLI submits with a token, the fake runs the job and the CLI reads it FINISHED."""
        url = await self.start_fake(token=TOKEN, vo=VO, duration=0)
        out, _ = await self.cli(SUBMIT, "-s", url, "--access-token", TOKEN, self.SOURCE, self.DESTINATION)
        self.assertIn("Job successfully submitted.", out)
        job_id = self.job_id(out)
        self.assertEqual(str(uuid.UUID(job_id)), job_id)
        job = self.fake.jobs[job_id]
        (entry,) = job["_files"]
        self.assertEqual((entry["source_surl"], entry["dest_surl"]), (self.SOURCE, self.DESTINATION))
        self.assertEqual(job["job_metadata"]["auth_method"], "oauth2")
        self.assertEqual(self.fake.count("GET", "/"), 1)
        self.assertEqual(self.fake.count("POST", "/jobs"), 1)
        self.assertEqual(self.fake.count("GET", "/whoami"), 0)  # token mode: no delegation at all

        await self.wait_job(job_id)
        out, _ = await self.cli(STATUS, "-s", url, "--access-token", TOKEN, job_id)
        self.assertIn(f"Request ID: {job_id}\n", out)
        self.assertIn("Status: FINISHED\n", out)
        self.assertIn(f"VO Name: {VO}\n", out)
        self.assertIn("Priority: 3\n", out)
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}"), 1)

    async def test_status_while_active_and_failed_reason(self):
        """When a job is still running the CLI shows ACTIVE; when its file failed, FAILED and FTS's reason."""
        url = await self.start_fake(
            token=TOKEN, vo=VO, duration=0, slow=["slow-product=3600"], fail=["bad-product=FAILED:SOURCE [2] gone"]
        )
        slow_out, _ = await self.cli(
            SUBMIT, "-s", url, "--access-token", TOKEN, self.SOURCE + "/slow-product", self.DESTINATION + "/slow"
        )
        bad_out, _ = await self.cli(
            SUBMIT, "-s", url, "--access-token", TOKEN, self.SOURCE + "/bad-product", self.DESTINATION + "/bad"
        )
        slow_id, bad_id = self.job_id(slow_out), self.job_id(bad_out)
        await self.wait_job(slow_id, ("ACTIVE",))
        await self.wait_job(bad_id)
        out, _ = await self.cli(STATUS, "-s", url, "--access-token", TOKEN, slow_id)
        self.assertIn("Status: ACTIVE\n", out)
        out, _ = await self.cli(STATUS, "-s", url, "--access-token", TOKEN, bad_id)
        self.assertIn("Status: FAILED\n", out)
        self.assertIn(f"Reason: {self.fake.jobs[bad_id]['reason']}\n", out)

    async def test_json_output(self):
        """When asked for JSON (-j), submit prints the id as JSON and status the job with its files and dm."""
        url = await self.start_fake(token=TOKEN, vo=VO, duration=0)
        out, _ = await self.cli(SUBMIT, "-j", "-s", url, "--access-token", TOKEN, self.SOURCE, self.DESTINATION)
        job_id = json.loads(out)
        self.assertIn(job_id, self.fake.jobs)
        await self.wait_job(job_id)
        out, _ = await self.cli(STATUS, "-j", "-s", url, "--access-token", TOKEN, job_id)
        shown = json.loads(out)
        self.assertEqual((shown["job_id"], shown["job_state"]), (job_id, "FINISHED"))
        self.assertEqual([f["file_state"] for f in shown["files"]], ["FINISHED"])
        self.assertEqual(shown["dm"], [])  # a transfer job has no data-management operations
        self.assertEqual(self.fake.count("GET", "/jobs/{id}/files"), 1)
        self.assertEqual(self.fake.count("GET", "/jobs/{id}/dm"), 1)

    async def test_deterministic_id_and_duplicate(self):
        """When a bulk file asks for a deterministic id, the CLI gets FTS's id; a resubmission gets 409."""
        url = await self.start_fake(token=TOKEN, vo=VO, duration=0)
        sid = str(uuid.uuid4())
        bulk = os.path.join(self.home, "bulk.json")
        with open(bulk, "w") as handle:
            json.dump(
                {
                    "files": [
                        {
                            "sources": [self.SOURCE],
                            "destinations": [self.DESTINATION],
                            "source_tokens": [TOKEN],
                            "destination_tokens": [TOKEN],
                        }
                    ],
                    "params": {"id_generator": "deterministic", "sid": sid},
                },
                handle,
            )
        out, _ = await self.cli(SUBMIT, "-s", url, "--access-token", TOKEN, "-f", bulk)
        self.assertEqual(self.job_id(out), deterministic_job_id(VO, sid))
        out, err = await self.cli(SUBMIT, "-s", url, "--access-token", TOKEN, "-f", bulk, expect=1)
        self.assertIn("409", out + err)
        self.assertEqual(self.fake.submissions[sid], 1)

    async def test_wrong_token_refused(self):
        """When the token is not one the fake accepts, the CLI reports Unauthorized and nothing is submitted."""
        url = await self.start_fake(token=TOKEN, vo=VO)
        out, err = await self.cli(SUBMIT, "-s", url, "--access-token", "not-" + TOKEN, self.SOURCE,
                                  self.DESTINATION, expect=1)
        self.assertIn("Unauthorized", out + err)
        self.assertEqual(self.fake.jobs, {})

    async def test_unknown_job(self):
        """When the job id is unknown, the status CLI says so and exits 1."""
        url = await self.start_fake(token=TOKEN, vo=VO)
        missing = str(uuid.uuid4())
        out, err = await self.cli(STATUS, "-s", url, "--access-token", TOKEN, missing, expect=1)
        self.assertIn(missing, out + err)


class X509ModeTests(OfficialClientTestCase):
    """Over HTTPS with a client certificate, the official CLI delegates a proxy (signed by M2Crypto) first."""

    SOURCE = "gsiftp://archive.example.org/staged/sample-002"
    DESTINATION = "gsiftp://storage.example.org/deliveries/sample-002"

    async def start_tls_fake(self):
        ca = testx509.make_ca()
        self.user = testx509.make_user(ca, "Official Client User")
        self.proxy = testx509.make_proxy(self.user)
        host = testx509.make_host(ca, "127.0.0.1")
        self.paths = testx509.write_credentials(
            os.path.join(self.home, "grid"), ca=ca, user=self.user, proxy=self.proxy, host=host
        )
        tls = server_tls_options(self.paths.host_cert, self.paths.host_key, self.paths.ca_cert)
        return await self.start_fake(tls_options=tls, auth="x509", vo=VO, duration=0)

    async def check_delegated_and_submitted(self, url, credential_args, signer):
        out, _ = await self.cli(SUBMIT, "-s", url, "--capath", self.paths.ca_cert, *credential_args,
                                self.SOURCE, self.DESTINATION)
        job_id = self.job_id(out)
        dn = "/DC=org/DC=transferd-test/OU=Users/CN=Official Client User"
        self.assertEqual(self.fake.jobs[job_id]["user_dn"], dn)
        (credential,) = self.fake.credentials.values()
        self.assertEqual(credential["dn"], dn)
        chain = credential["proxy"]
        # The client's proxy passes our own server-side checks too, and names its signer next.
        (key,) = self.fake.credential_requests.values()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        check_delegated_proxy(chain, key_pem)
        self.assertEqual(x509.load_pem_x509_certificates(chain)[1], signer)
        for method, endpoint in [("GET", "/whoami"), ("GET", "/delegation/{id}"), ("GET", "/delegation/{id}/request"),
                                 ("PUT", "/delegation/{id}/credential")]:
            self.assertGreaterEqual(self.fake.count(method, endpoint), 1, f"{method} {endpoint}")

        await self.wait_job(job_id)
        out, _ = await self.cli(STATUS, "-s", url, "--capath", self.paths.ca_cert, *credential_args, job_id)
        self.assertIn("Status: FINISHED\n", out)
        self.assertIn(f"Client DN: {dn}\n", out)

    async def test_user_certificate(self):
        """When the CLI holds a user certificate and key, it delegates a proxy the fake accepts, then submits."""
        url = await self.start_tls_fake()
        await self.check_delegated_and_submitted(
            url, ["--cert", self.paths.user_cert, "--key", self.paths.user_key], self.user.cert
        )

    async def test_proxy_file(self):
        """When the CLI holds a proxy made by transferd.testing.x509, TLS and the delegation both accept it."""
        url = await self.start_tls_fake()
        await self.check_delegated_and_submitted(url, ["--cert", self.paths.proxy], self.proxy.cert)
