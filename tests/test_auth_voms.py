"""VOMS attribute certificates in client proxies: which FQANs are believed, and what they grant."""

import datetime
import os
import time

from twisted.internet import task
from twisted.logger import Logger
from twisted.trial import unittest

from transferd.auth.access import Access, Identity
from transferd.auth.voms import VOMSTrust, credential_lifetime, fqan_matches
from transferd.config import ConfigError, load_config
from transferd.testing import x509 as testx509

PRODUCTION = "/meerkat/Role=production/Capability=NULL"


class Material:
    """A CA, two users, a VOMS server for meerkat, one for another VO, and a stranger VOMS server."""

    def __init__(self):
        self.ca = testx509.make_ca(key_kind="ec")
        self.alice = testx509.make_user(self.ca, "Alice Example", key_kind="ec")
        self.bob = testx509.make_user(self.ca, "Bob Example", key_kind="ec")
        self.voms = testx509.make_voms_server(self.ca, "voms.meerkat.test", key_kind="ec")
        self.other_vo = testx509.make_voms_server(self.ca, "voms.other.test", key_kind="ec")
        self.stranger = testx509.make_voms_server(self.ca, "voms.stranger.test", key_kind="ec")

    def chain(self, proxy):
        return [proxy.cert] + proxy.chain


MATERIAL = Material()  # key generation is the slow part: once for the module


class VOMSTrustTests(unittest.TestCase):
    def setUp(self):
        self.m = MATERIAL
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.directory = self.mktemp()
        testx509.write_voms_dir(self.directory, {"meerkat": [self.m.voms], "other": [self.m.other_vo]})
        self.events = []
        self.trust = VOMSTrust(self.directory, self.clock)
        self.trust.log = Logger(namespace="voms", observer=self.events.append)

    def fqans(self, proxy):
        return self.trust.fqans(self.m.chain(proxy))

    def logged(self):
        return " ".join(event.get("reason", "") and str(event["reason"]) for event in self.events)

    def test_valid_ac(self):
        """When a proxy carries an AC signed by a configured VOMS server for its VO, its FQANs are believed."""
        proxy = testx509.make_voms_proxy(self.m.alice, self.m.voms, "meerkat", [PRODUCTION, "/meerkat/NULL"],
                                         key_kind="ec")
        self.assertEqual(self.fqans(proxy), (PRODUCTION, "/meerkat/NULL"))
        self.assertEqual(self.events, [])

    def test_proxy_of_a_voms_proxy(self):
        """When a VOMS proxy is delegated again, the AC in the chain still names the user's FQANs."""
        proxy = testx509.make_voms_proxy(self.m.alice, self.m.voms, "meerkat", [PRODUCTION], key_kind="ec")
        second = testx509.make_proxy(proxy, key_kind="ec")
        self.assertEqual(self.fqans(second), (PRODUCTION,))

    def test_expired_ac_ignored(self):
        """When the AC has expired (while the proxy is still valid), it is ignored and the reason logged."""
        proxy = testx509.make_voms_proxy(self.m.alice, self.m.voms, "meerkat", [PRODUCTION], key_kind="ec",
                                         ac_lifetime_seconds=60)
        self.assertEqual(self.fqans(proxy), (PRODUCTION,))
        self.clock.advance(600)
        self.assertEqual(self.fqans(proxy), ())
        self.assertIn("does not include now", self.logged())

    def test_forged_ac_ignored(self):
        """When the AC names a configured server but is signed with another key, it is ignored."""
        proxy = testx509.make_voms_proxy(self.m.alice, self.m.voms, "meerkat", [PRODUCTION], key_kind="ec",
                                         signer_key=self.m.stranger.key)
        self.assertEqual(self.fqans(proxy), ())
        self.assertIn("signature does not verify", self.logged())

    def test_untrusted_server_ignored(self):
        """When the AC comes from a VOMS server that is not configured, it is ignored."""
        proxy = testx509.make_voms_proxy(self.m.alice, self.m.stranger, "meerkat", [PRODUCTION], key_kind="ec")
        self.assertEqual(self.fqans(proxy), ())
        self.assertIn("not a VOMS server configured for VO meerkat", self.logged())

    def test_server_of_another_vo_ignored(self):
        """When a server configured for one VO signs an AC for another, or claims FQANs outside its VO, it is ignored."""
        for_meerkat = testx509.make_voms_proxy(self.m.alice, self.m.other_vo, "meerkat", [PRODUCTION], key_kind="ec")
        self.assertEqual(self.fqans(for_meerkat), ())
        outside = testx509.make_voms_proxy(self.m.alice, self.m.other_vo, "other", ["/other", PRODUCTION],
                                           key_kind="ec")
        self.assertEqual(self.fqans(outside), ())
        self.assertIn(f"it claims {PRODUCTION}, outside its VO other", self.logged())

    def test_ac_of_another_holder_ignored(self):
        """When Bob's proxy carries an AC issued for Alice's certificate, it is ignored."""
        alices_ac = testx509.make_attribute_certificate(self.m.voms, self.m.alice, "meerkat", [PRODUCTION])
        proxy = testx509.make_voms_proxy(self.m.bob, self.m.voms, key_kind="ec", acs=[alices_ac])
        self.assertEqual(self.fqans(proxy), ())
        self.assertIn("issued for another certificate", self.logged())

    def test_flat_voms_dir_trusts_any_vo(self):
        """When a server certificate lies directly in voms_dir, its ACs for any VO are believed."""
        flat = self.mktemp()
        testx509.write_voms_dir(flat, {None: [self.m.stranger]})
        proxy = testx509.make_voms_proxy(self.m.alice, self.m.stranger, "meerkat", [PRODUCTION], key_kind="ec")
        self.assertEqual(VOMSTrust(flat, self.clock).fqans(self.m.chain(proxy)), (PRODUCTION,))

    def test_voms_dir_read_again_when_it_changes(self):
        """When a VOMS server certificate is added to voms_dir, its ACs are believed from the next check on."""
        proxy = testx509.make_voms_proxy(self.m.alice, self.m.stranger, "meerkat", [PRODUCTION], key_kind="ec")
        self.assertEqual(self.fqans(proxy), ())
        testx509.write_voms_dir(self.directory, {"meerkat": [self.m.stranger]})
        self.clock.advance(10)
        self.assertEqual(self.fqans(proxy), (PRODUCTION,))

    def test_plain_proxy_and_certificate(self):
        """When the client has a proxy without VOMS extension, or a plain certificate, there are no FQANs."""
        self.assertEqual(self.fqans(testx509.make_proxy(self.m.alice, key_kind="ec")), ())
        self.assertEqual(self.trust.fqans([self.m.alice.cert]), ())

    def test_malformed_extension_ignored(self):
        """When the VOMS extension holds something that is not an AC, it is ignored, not an error."""
        proxy = testx509.make_voms_proxy(self.m.alice, self.m.voms, key_kind="ec", acs=[b"\x30\x03\x02\x01\x01"])
        self.assertEqual(self.fqans(proxy), ())
        self.assertIn("cannot be decoded", self.logged())


class FQANRulesTests(unittest.TestCase):
    def test_fqan_prefix_matches_by_component(self):
        """When a rule names an FQAN, identities with that FQAN or one under it match; a longer name does not."""
        self.assertTrue(fqan_matches([PRODUCTION], "/meerkat/Role=production"))
        self.assertTrue(fqan_matches(["/meerkat/ops/Role=NULL"], "/meerkat"))
        self.assertFalse(fqan_matches(["/meerkatx/Role=NULL"], "/meerkat"))
        self.assertFalse(fqan_matches(["/meerkat/Role=productionx"], "/meerkat/Role=production"))
        self.assertFalse(fqan_matches([], "/meerkat"))

    def test_admins_by_fqan(self):
        """When [auth] admins names an FQAN, a client holding it sees and cancels every job; others do not."""
        access = Access(x509=True, admins=["/meerkat/Role=production", "/DC=org/CN=Operator"])
        admin = Identity("/DC=org/CN=Alice", "x509", (PRODUCTION,))
        member = Identity("/DC=org/CN=Bob", "x509", ("/meerkat/Role=NULL/Capability=NULL",))
        self.assertTrue(access.is_admin(admin))
        self.assertFalse(access.is_admin(member))
        self.assertTrue(access.is_admin(Identity("/DC=org/CN=Operator", "x509")))
        # A DN rule is never read as an FQAN, even by a client whose FQANs start like it.
        self.assertFalse(access.is_admin(Identity("/DC=org/CN=Eve", "x509", ("/DC=org/CN=Operator",))))

    def test_config_accepts_fqans_and_voms_dir(self):
        """When [auth] admins lists FQANs and voms_dir is a directory, the configuration loads; else it names the key."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "transferd-data", "archive"))
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        testx509.write_credentials(directory, ca=MATERIAL.ca, host=testx509.make_host(MATERIAL.ca, key_kind="ec"))
        vomsdir = testx509.write_voms_dir(os.path.join(directory, "vomsdir"), {"meerkat": [MATERIAL.voms]})
        base = {("api", "tls_cert"): "hostcert.pem", ("api", "tls_key"): "hostkey.pem",
                ("auth", "x509_ca_path"): "certificates", ("auth", "voms_dir"): vomsdir,
                ("auth", "admins"): "/meerkat/Role=production\n/meerkat\n/DC=org/CN=Operator"}
        config = load_config(None, base)
        self.assertEqual(config.auth.admins, ("/meerkat/Role=production", "/meerkat", "/DC=org/CN=Operator"))
        self.assertEqual(config.auth.voms_dir, vomsdir)
        refused = str(self.assertRaises(ConfigError, load_config, None, {**base, ("auth", "admins"): "/meerkat/x y"}))
        self.assertIn("[auth] admins", refused)
        refused = str(self.assertRaises(ConfigError, load_config, None, {**base, ("auth", "voms_dir"): "missing"}))
        self.assertIn("[auth] voms_dir = 'missing' is not a directory", refused)
        refused = str(self.assertRaises(ConfigError, load_config, None, {("auth", "voms_dir"): vomsdir}))
        self.assertIn("[auth] voms_dir needs [auth] x509_ca_path", refused)


class OwnCredentialTests(unittest.TestCase):
    def test_voms_attributes_shorter_than_the_proxy(self):
        """When our proxy's VOMS attributes end before the proxy, its lifetime is theirs, and says so."""
        now = time.time()
        proxy = testx509.make_voms_proxy(MATERIAL.alice, MATERIAL.voms, key_kind="ec", ac_lifetime_seconds=3600,
                                         lifetime_seconds=12 * 3600)
        left, what = credential_lifetime(proxy.proxy_file_pem, now)
        self.assertLess(abs(left - 3600), 5)
        self.assertEqual(what, "the VOMS attributes of meerkat")
        plain = testx509.make_proxy(MATERIAL.alice, lifetime_seconds=7200, key_kind="ec")
        left, what = credential_lifetime(plain.proxy_file_pem, now)
        self.assertLess(abs(left - 7200), 5)
        self.assertEqual(what, "the certificate")

    def test_expired_attributes_count_as_negative(self):
        """When the VOMS attributes have expired already, the lifetime left is negative."""
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=2)
        proxy = testx509.make_voms_proxy(MATERIAL.alice, MATERIAL.voms, key_kind="ec", ac_lifetime_seconds=600,
                                         ac_now=past)
        left, _ = credential_lifetime(proxy.proxy_file_pem, time.time())
        self.assertLess(left, 0)


class DelegationTests(unittest.TestCase):
    """Our own VOMS proxy towards the fake FTS3: the delegated proxy lasts no longer than its VOMS attributes."""

    timeout = 30

    async def test_delegation_counts_the_voms_lifetime(self):
        """When our proxy's AC ends in 2 h (the proxy in 12 h), FTS gets a 2 h proxy, and a warning is logged."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from twisted.internet import reactor
        from twisted.logger import LogLevel, globalLogPublisher

        from tests.test_fts_client import job
        from transferd.fts.client import FTSClient
        from transferd.testing.fakefts import FakeFTSServer, TestPKI

        base = os.path.abspath(self.mktemp())
        pki = TestPKI.create(os.path.join(base, "pki"))
        with open(pki.user_cert, "rb") as cert, open(pki.user_key, "rb") as key:
            user = testx509.Credential(x509.load_pem_x509_certificate(cert.read()),
                                       serialization.load_pem_private_key(key.read(), None))
        proxy = testx509.make_voms_proxy(user, MATERIAL.voms, key_kind="ec", ac_lifetime_seconds=2 * 3600,
                                         lifetime_seconds=12 * 3600)
        paths = testx509.write_credentials(base, proxy=proxy)
        server = FakeFTSServer(reactor, tls_options=pki.server_options(), auth="x509", token=None)
        await server.start()
        self.addCleanup(server.stop)
        client = FTSClient(server.url, reactor, reactor, auth="x509", proxy=paths.proxy, ca_path=pki.ca,
                           request_timeout=5)
        self.addCleanup(client.stop)
        warnings = []

        def observer(event):
            if event.get("log_level") == LogLevel.warn:
                warnings.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        who = await client.whoami()
        await client.submit(job("voms"))
        left = server.fake.credentials[who["delegation_id"]]["termination_time"] - time.time()
        self.assertLess(abs(left - (2 * 3600 - 60)), 120)
        self.assertEqual([event.get("limited_by") for event in warnings if "limited_by" in event],
                         ["the VOMS attributes of meerkat"])
