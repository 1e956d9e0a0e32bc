"""X.509 client authentication over real TLS: grid CA directory, CRLs failing closed, RFC 3820 proxies, DNs."""

import datetime
import json
import os
import shutil
import subprocess

import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, task
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from transferd.auth.x509 import ServerTLS, canonical_dn, end_entity, peer_dn
from transferd.testing import x509 as testx509
from transferd.tls import CredentialError, client_tls_policy

UTC = datetime.timezone.utc
A = x509.NameAttribute


def rdn(*attributes):
    return x509.RelativeDistinguishedName(list(attributes))


def self_signed(name, extensions=()):
    """A certificate with subject name, round-tripped through DER as a peer's would be."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return x509.load_der_x509_certificate(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def openssl_cli(*args, stdin):
    """The output of the openssl command (scripts/test.sh installs it)."""
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True).stdout.decode().strip()


class CanonicalDNTests(unittest.SynchronousTestCase):
    """canonical_dn writes names in the grid's slash form."""

    def test_several_organizational_units(self):
        """When a name has several OUs, they stay in the certificate's order, most significant first."""
        name = self_signed(x509.Name([
            A(NameOID.DOMAIN_COMPONENT, "org"), A(NameOID.DOMAIN_COMPONENT, "example"),
            A(NameOID.ORGANIZATIONAL_UNIT_NAME, "People"), A(NameOID.ORGANIZATIONAL_UNIT_NAME, "Physics"),
            A(NameOID.COMMON_NAME, "Alice Example"),
        ])).subject
        self.assertEqual(canonical_dn(name), "/DC=org/DC=example/OU=People/OU=Physics/CN=Alice Example")

    def test_multi_valued_rdn_and_email(self):
        """When an RDN has several attributes they are joined with "+"; emailAddress and UID keep OpenSSL's names."""
        name = self_signed(x509.Name([
            rdn(A(NameOID.COUNTRY_NAME, "CH")),
            rdn(A(NameOID.USER_ID, "alice"), A(NameOID.COMMON_NAME, "Alice")),
            rdn(A(NameOID.EMAIL_ADDRESS, "alice@example.org")),
        ])).subject
        self.assertEqual(canonical_dn(name), "/C=CH/CN=Alice+UID=alice/emailAddress=alice@example.org")

    def test_unknown_attribute(self):
        """When an attribute has no short name, its dotted OID is written."""
        name = x509.Name([A(NameOID.COMMON_NAME, "Alice"), A(x509.ObjectIdentifier("1.2.3.4.5"), "x")])
        self.assertEqual(canonical_dn(name), "/CN=Alice/1.2.3.4.5=x")

    def test_same_as_openssl(self):
        """When OpenSSL prints a subject in its compat form, it is canonical_dn's string."""
        cert = self_signed(x509.Name([
            rdn(A(NameOID.DOMAIN_COMPONENT, "org")), rdn(A(NameOID.COUNTRY_NAME, "DE")),
            rdn(A(NameOID.STATE_OR_PROVINCE_NAME, "Hessen")), rdn(A(NameOID.LOCALITY_NAME, "Darmstadt")),
            rdn(A(NameOID.ORGANIZATION_NAME, "GSI")), rdn(A(NameOID.ORGANIZATIONAL_UNIT_NAME, "IT")),
            rdn(A(NameOID.SERIAL_NUMBER, "42"), A(NameOID.TITLE, "Dr")), rdn(A(NameOID.SURNAME, "Example")),
            rdn(A(NameOID.GIVEN_NAME, "Alice")), rdn(A(NameOID.EMAIL_ADDRESS, "alice@example.org")),
            rdn(A(NameOID.USER_ID, "alice")), rdn(A(x509.ObjectIdentifier("1.2.3.4.5"), "x")),
            rdn(A(NameOID.COMMON_NAME, "Alice Example")),
        ]))
        printed = openssl_cli("x509", "-noout", "-subject", "-nameopt", "compat",
                              stdin=cert.public_bytes(serialization.Encoding.PEM))
        self.assertEqual(printed, "subject=" + canonical_dn(cert.subject))

    def test_end_entity_skips_gt3_proxies(self):
        """When a certificate has the pre-RFC (GT3) proxy extension, the end entity is the next one."""
        gt3 = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.3536.1.222"), b"\x30\x00")
        proxy = self_signed(x509.Name([A(NameOID.COMMON_NAME, "Alice"), A(NameOID.COMMON_NAME, "proxy")]), [gt3])
        user = self_signed(x509.Name([A(NameOID.COMMON_NAME, "Alice")]))
        self.assertIs(end_entity([proxy, user]), user)
        self.assertIsNone(end_entity([proxy]))


class CADirectoryTests(unittest.SynchronousTestCase):
    """write_ca_dir writes the grid layout OpenSSL looks CAs and CRLs up in."""

    def test_hash_names(self):
        """When a CA and its CRL are written, both are named after the hash `openssl x509 -hash` prints."""
        ca = testx509.make_ca(key_kind="ec")
        directory = testx509.write_ca_dir(self.mktemp(), cas=[ca], crls=[testx509.make_crl(ca)], policy_files=True)
        name_hash = openssl_cli("x509", "-noout", "-hash", stdin=ca.cert_pem)
        self.assertEqual(
            sorted(os.listdir(directory)),
            [f"{name_hash}.0", f"{name_hash}.namespaces", f"{name_hash}.r0", f"{name_hash}.signing_policy"],
        )

    def test_crl_of_unknown_ca(self):
        """When a CRL's CA is not among those written, write_ca_dir refuses it."""
        ca, other = testx509.make_ca(key_kind="ec"), testx509.make_ca("other CA", key_kind="ec")
        with self.assertRaises(ValueError):
            testx509.write_ca_dir(self.mktemp(), cas=[ca], crls=[testx509.make_crl(other)])


class WhoAmI(Resource):
    """Answers {"dn": peer_dn(request), "channel": id of the HTTP channel}."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"dn": peer_dn(request), "channel": id(request.channel)}).encode()


class ServerTLSTests(unittest.TestCase):
    """ServerTLS accepts verified client certificates and proxies, and nothing else."""

    timeout = 10

    @classmethod
    def setUpClass(cls):
        def make(kind, *args, **kwargs):
            return kind(*args, key_kind="ec", **kwargs)

        past = datetime.datetime.now(UTC) - datetime.timedelta(days=3)
        cls.ca = make(testx509.make_ca)
        cls.other_ca = make(testx509.make_ca, "another CA")
        cls.host = make(testx509.make_host, cls.ca, "localhost")
        cls.alice = make(testx509.make_user, cls.ca, "Alice Example")
        cls.bob = make(testx509.make_user, cls.ca, "Bob Example")
        cls.revoked = make(testx509.make_user, cls.ca, "Mallory Revoked")
        cls.expired = make(testx509.make_user, cls.ca, "Old Timer", now=past, lifetime_seconds=86400)
        cls.stranger = make(testx509.make_user, cls.other_ca, "Eve Stranger")
        cls.proxy = make(testx509.make_proxy, cls.alice)
        cls.bob_proxy = make(testx509.make_proxy, cls.bob)

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.paths = testx509.write_credentials(self.directory, ca=self.ca, host=self.host)
        self.ca_dir = os.path.join(self.directory, "grid-certificates")
        self.write_ca_dir(revoked=[self.revoked])
        self.logged = []

    def write_ca_dir(self, revoked=(), crls=None):
        """The CA directory: our CA with a CRL revoking revoked (or crls), and the policy files of IGTF bundles."""
        if crls is None:
            crls = [testx509.make_crl(self.ca, revoked=revoked)]
        testx509.write_ca_dir(self.ca_dir, cas=[self.ca], crls=crls, policy_files=True)

    def serve(self, require_client_cert=True, clock=reactor):
        """Listen on 127.0.0.1 with ServerTLS in front of WhoAmI; the URL to ask."""
        tls = ServerTLS(self.paths.host_cert, self.paths.host_key, ca_path=self.ca_dir,
                        require_client_cert=require_client_cert, clock=clock)
        tls.log = Logger(observer=self.logged.append)
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(tls, False, Site(WhoAmI())), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"https://127.0.0.1:{port.getHost().port}/"

    def client(self, credential=None, persistent=False):
        """An HTTP client presenting credential (a user certificate, or a proxy file holding its chain)."""
        kwargs, where = {}, os.path.join(self.directory, "client-%d" % id(credential))
        if credential is not None and credential.chain:  # a proxy: one file, with its key and chain
            kwargs["cert"] = testx509.write_credentials(where, proxy=credential).proxy
        elif credential is not None:
            written = testx509.write_credentials(where, user=credential)
            kwargs = {"cert": written.user_cert, "key": written.user_key}
        pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.addCleanup(pool.closeCachedConnections)
        return Agent(reactor, contextFactory=client_tls_policy(self.paths.ca_cert, **kwargs), pool=pool)

    async def ask(self, url, agent):
        """What WhoAmI answered."""
        response = await treq.get(url, agent=agent).addTimeout(5, reactor)
        self.assertEqual(response.code, 200)
        return json.loads(await treq.content(response))

    async def assert_refused(self, url, credential, reason=None):
        """The request of a client presenting credential fails, and the server logged why (when reason)."""
        with self.assertRaises(Exception):
            await self.ask(url, self.client(credential))
        if reason is not None:
            logged = [event["reason"] for event in self.logged if "reason" in event]
            self.assertIn(reason, logged)

    async def test_user_certificate(self):
        """When a user presents a valid certificate, the request sees its DN."""
        url = self.serve()
        answer = await self.ask(url, self.client(self.alice))
        self.assertEqual(answer["dn"], "/DC=org/DC=transferd-test/OU=Users/CN=Alice Example")

    async def test_keep_alive(self):
        """When a keep-alive connection makes two requests, both see the DN."""
        url = self.serve()
        agent = self.client(self.alice, persistent=True)
        first, second = await self.ask(url, agent), await self.ask(url, agent)
        self.assertEqual(first, second)
        self.assertEqual(first["dn"], canonical_dn(self.alice.subject))

    async def test_no_certificate_required(self):
        """When a certificate is required and the client presents none, the handshake fails."""
        await self.assert_refused(self.serve(), None)

    async def test_no_certificate_optional(self):
        """When a certificate is optional and the client presents none, the request sees no DN."""
        answer = await self.ask(self.serve(require_client_cert=False), self.client())
        self.assertIsNone(answer["dn"])

    async def test_bad_certificate_optional(self):
        """When a certificate is optional and the client presents an expired one, the handshake still fails."""
        await self.assert_refused(self.serve(require_client_cert=False), self.expired, "it has expired")

    async def test_unknown_ca(self):
        """When the client's CA is not in the CA directory, the handshake fails."""
        await self.assert_refused(self.serve(), self.stranger, "its CA is not in the CA directory")

    async def test_expired_certificate(self):
        """When the client's certificate has expired, the handshake fails."""
        await self.assert_refused(self.serve(), self.expired, "it has expired")

    async def test_revoked_certificate(self):
        """When the client's certificate is in its CA's CRL, the handshake fails."""
        await self.assert_refused(self.serve(), self.revoked, "it has been revoked")

    async def test_no_crl(self):
        """When the CA directory has no CRL for the client's CA, the handshake fails: fail closed."""
        os.unlink(os.path.join(self.ca_dir, testx509.subject_hash(self.ca.cert) + ".r0"))
        await self.assert_refused(self.serve(), self.alice, "there is no CRL for its CA in the CA directory"
                                  " (is fetch-crl running?)")

    async def test_expired_crl(self):
        """When the CRL of the client's CA has expired, the handshake fails."""
        past = datetime.datetime.now(UTC) - datetime.timedelta(days=3)
        self.write_ca_dir(crls=[testx509.make_crl(self.ca, now=past)])
        await self.assert_refused(self.serve(), self.alice, "its CA's CRL has expired (is fetch-crl running?)")

    async def test_proxy(self):
        """When a user presents an RFC 3820 proxy, the request sees the user's DN, not the proxy's."""
        answer = await self.ask(self.serve(), self.client(self.proxy))
        self.assertEqual(answer["dn"], canonical_dn(self.alice.subject))
        self.assertTrue(canonical_dn(self.proxy.subject).startswith(answer["dn"] + "/CN="))

    async def test_proxy_of_proxy(self):
        """When a user presents a proxy of a proxy, the request sees the user's DN."""
        answer = await self.ask(self.serve(), self.client(testx509.make_proxy(self.proxy, key_kind="ec")))
        self.assertEqual(answer["dn"], canonical_dn(self.alice.subject))

    async def test_proxy_of_other_user(self):
        """When another user presents their proxy, the request sees that user's DN."""
        answer = await self.ask(self.serve(), self.client(self.bob_proxy))
        self.assertEqual(answer["dn"], "/DC=org/DC=transferd-test/OU=Users/CN=Bob Example")

    async def test_proxy_of_revoked_user(self):
        """When a revoked user presents a proxy, the handshake fails."""
        proxy = testx509.make_proxy(self.revoked, key_kind="ec")
        await self.assert_refused(self.serve(), proxy, "it has been revoked")

    async def test_forged_proxy(self):
        """When Bob signs a proxy claiming to be Alice's, with her certificate as its chain, the handshake fails."""
        forged = testx509.make_forged_proxy(self.bob, self.alice, key_kind="ec")
        await self.assert_refused(self.serve(), forged, "its signature does not verify")

    async def test_proxy_renamed(self):
        """When Bob's genuine proxy has a subject claiming Alice's DN, the handshake fails."""
        renamed = testx509.make_forged_proxy(self.bob, self.alice, claimed_issuer=False, key_kind="ec")
        await self.assert_refused(self.serve(), renamed)
        self.assertTrue(self.logged)

    async def test_crl_updated(self):
        """When fetch-crl writes a CRL revoking a certificate, new connections from it fail after the next check."""
        clock = task.Clock()
        url = self.serve(clock=clock)
        answer = await self.ask(url, self.client(self.bob))
        self.assertEqual(answer["dn"], canonical_dn(self.bob.subject))
        self.write_ca_dir(revoked=[self.revoked, self.bob])
        clock.advance(5)
        await self.assert_refused(url, self.bob, "it has been revoked")
        answer = await self.ask(url, self.client(self.alice))
        self.assertEqual(answer["dn"], canonical_dn(self.alice.subject))

    async def test_server_certificate_renewed(self):
        """When our certificate is replaced in place, new connections get the new one after the next check."""
        clock = task.Clock()
        url = self.serve(clock=clock)
        testx509.write_credentials(self.directory, host=testx509.make_host(self.other_ca, key_kind="ec"))
        clock.advance(5)
        with self.assertRaises(Exception):  # the client trusts only the first CA
            await self.ask(url, self.client(self.alice))
        self.assertTrue(any(formatEvent(event).startswith("TLS settings reloaded") for event in self.logged))

    async def test_server_certificate_broken(self):
        """When our key file becomes unusable after start, the problem is logged and the old settings kept."""
        clock = task.Clock()
        url = self.serve(clock=clock)
        with open(self.paths.host_key, "wb") as handle:
            handle.write(b"not a key")
        clock.advance(5)
        answer = await self.ask(url, self.client(self.alice))
        self.assertEqual(answer["dn"], canonical_dn(self.alice.subject))
        [warning] = [event for event in self.logged if event["log_level"] == LogLevel.warn]
        self.assertIn(self.paths.host_key, formatEvent(warning))


class ServerTLSFilesTests(unittest.SynchronousTestCase):
    """ServerTLS refuses unusable files when it is made, naming them."""

    @classmethod
    def setUpClass(cls):
        ca = testx509.make_ca(key_kind="ec")
        cls.ca, cls.host = ca, testx509.make_host(ca, key_kind="ec")

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.paths = testx509.write_credentials(self.directory, ca=self.ca, host=self.host)

    def assert_refused(self, name, *args, **kwargs):
        with self.assertRaises(CredentialError) as caught:
            ServerTLS(*args, clock=task.Clock(), **kwargs)
        self.assertIn(name, str(caught.exception))

    def test_missing_certificate(self):
        """When the certificate file does not exist, the error names it."""
        missing = os.path.join(self.directory, "nothing.pem")
        self.assert_refused(missing, missing, self.paths.host_key)

    def test_unreadable_key(self):
        """When the key file cannot be read (here: a directory), the error names it."""
        self.assert_refused(self.directory, self.paths.host_cert, self.directory)

    def test_not_a_certificate(self):
        """When the certificate file holds no certificate, the error names it."""
        self.assert_refused(self.paths.host_key, self.paths.host_key, self.paths.host_key)

    def test_key_of_another_certificate(self):
        """When the key does not belong to the certificate, the error names the certificate."""
        other = testx509.write_credentials(os.path.join(self.directory, "other"), host=testx509.make_host(
            self.ca, key_kind="ec"))
        self.assert_refused(self.paths.host_cert, self.paths.host_cert, other.host_key)

    def test_missing_ca_directory(self):
        """When the CA directory does not exist, the error names it."""
        missing = os.path.join(self.directory, "no-certificates")
        self.assert_refused(missing, self.paths.host_cert, self.paths.host_key, ca_path=missing)

    def test_ca_directory_not_hashed(self):
        """When the CA directory holds no <hash>.0 file (not rehashed), the error names it."""
        plain = os.path.join(self.directory, "plain-certificates")
        os.makedirs(plain)
        shutil.copy(self.paths.ca_cert, plain)
        self.assert_refused(plain, self.paths.host_cert, self.paths.host_key, ca_path=plain)

    def test_key_in_certificate_file(self):
        """When the key is in the certificate file and no key file is given, ServerTLS is made."""
        both = os.path.join(self.directory, "both.pem")
        with open(both, "wb") as handle:
            handle.write(self.host.cert_pem + self.host.key_pem)
        ServerTLS(both, None, ca_path=self.paths.ca_dir, clock=task.Clock())
