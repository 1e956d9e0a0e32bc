"""RFC 3820 proxy delegation: signing FTS3's request, reading credentials, and the server's checks."""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.trial import unittest

from transferd.fts import delegation
from transferd.fts.delegation import (
    INHERIT_ALL_OID,
    PROXY_CERT_INFO_OID,
    DelegationError,
    check_delegated_proxy,
    load_credential,
    new_proxy_request,
    remaining_lifetime,
    sign_proxy_request,
)
from transferd.testing import x509 as testx509

UTC = datetime.timezone.utc


def make_request(key=None, subject="Dummy"):
    """A CSR as FTS3 would answer it: (csr_pem, key)."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM), key


def certs(pem):
    return x509.load_pem_x509_certificates(pem)


def verify_signature(cert, issuer_key):
    """Raise unless issuer_key made cert's signature."""
    if isinstance(issuer_key, rsa.RSAPublicKey):
        issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    else:
        issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))


def same_key(one, other):
    form = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return one.public_bytes(*form) == other.public_bytes(*form)


class SignProxyRequestTests(unittest.SynchronousTestCase):
    """sign_proxy_request turns FTS3's request into an RFC 3820 proxy chain."""

    @classmethod
    def setUpClass(cls):
        cls.ca = testx509.make_ca()
        cls.user = testx509.make_user(cls.ca, "Alice Example")

    def sign(self, signer=None, lifetime_seconds=3600, **kwargs):
        signer = signer or self.user
        csr_pem, key = make_request()
        pem = sign_proxy_request(csr_pem, signer.cert_pem, signer.key_pem, signer.chain_pem, lifetime_seconds, **kwargs)
        return certs(pem), key

    def test_proxy_is_signed_by_the_user_key(self):
        """When a user signs a request, the proxy carries the request's key and the user's signature."""
        (proxy, *_), request_key = self.sign()
        verify_signature(proxy, self.user.key.public_key())
        self.assertTrue(same_key(proxy.public_key(), request_key.public_key()))
        self.assertEqual(proxy.issuer, self.user.cert.subject)

    def test_proxy_cert_info_inherit_all_critical(self):
        """When a proxy is made, it has the critical proxyCertInfo extension with id-ppl-inheritAll."""
        (proxy, *_), _ = self.sign()
        extension = proxy.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
        self.assertTrue(extension.critical)
        # SEQUENCE { SEQUENCE { OID 1.3.6.1.5.5.7.21.1 } }: no path length limit, inherit all
        self.assertEqual(extension.value.value, bytes.fromhex("300c300a06082b06010505071501"))
        self.assertEqual(delegation.proxy_policy_language(proxy), INHERIT_ALL_OID.dotted_string)
        self.assertTrue(delegation.is_proxy(proxy))
        self.assertFalse(delegation.is_proxy(self.user.cert))

    def test_key_usage_and_basic_constraints(self):
        """When a proxy is made, it is no CA and may sign (further proxies) but not certify or commit."""
        (proxy, *_), _ = self.sign()
        constraints = proxy.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertFalse(constraints.value.ca)
        usage = proxy.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.digital_signature)
        self.assertTrue(usage.value.key_encipherment)
        self.assertFalse(usage.value.key_cert_sign)
        self.assertFalse(usage.value.content_commitment)
        with self.assertRaises(x509.ExtensionNotFound):
            proxy.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    def test_subject_is_issuer_plus_cn(self):
        """When a proxy is made, its subject is the user's subject plus one CN: the proxy's serial number."""
        (proxy, *_), _ = self.sign()
        rdns = list(proxy.subject.rdns)
        self.assertEqual(rdns[:-1], list(self.user.cert.subject.rdns))
        (last,) = list(rdns[-1])
        self.assertEqual(last.oid, NameOID.COMMON_NAME)
        self.assertEqual(last.value, str(proxy.serial_number))
        self.assertGreater(proxy.serial_number, 0)

    def test_validity_within_the_users(self):
        """When the wanted lifetime is shorter than the user's, the proxy ends then and starts within the user's."""
        now = datetime.datetime.now(UTC)
        (proxy, *_), _ = self.sign(lifetime_seconds=3600, now=now)
        self.assertEqual(proxy.not_valid_after_utc, (now + datetime.timedelta(hours=1)).replace(microsecond=0))
        self.assertGreaterEqual(proxy.not_valid_before_utc, self.user.cert.not_valid_before_utc)
        self.assertLessEqual(proxy.not_valid_before_utc, now)
        self.assertLessEqual(proxy.not_valid_after_utc, self.user.cert.not_valid_after_utc)

    def test_lifetime_capped_by_the_user(self):
        """When the wanted lifetime reaches past the user's certificate, the proxy ends with the user's."""
        short = testx509.make_user(self.ca, "Short Lived", lifetime_seconds=1800)
        (proxy, *_), _ = self.sign(signer=short, lifetime_seconds=86400)
        self.assertEqual(proxy.not_valid_after_utc, short.cert.not_valid_after_utc)

    def test_lifetime_capped_by_the_chain(self):
        """When a certificate of the signer's chain ends before the signer, the proxy ends with it."""
        short_intermediate = testx509.make_ca("Short Intermediate", lifetime_seconds=900)
        csr_pem, _ = make_request()
        pem = sign_proxy_request(
            csr_pem, self.user.cert_pem, self.user.key_pem, short_intermediate.cert_pem, lifetime_seconds=86400
        )
        self.assertEqual(certs(pem)[0].not_valid_after_utc, short_intermediate.cert.not_valid_after_utc)

    def test_chain_order(self):
        """When a user signs, the PEM holds the proxy, then the user's certificate, then the user's chain."""
        intermediate_like = self.ca.cert  # any certificate given as chain is passed through, in order
        csr_pem, _ = make_request()
        ca_pem = intermediate_like.public_bytes(serialization.Encoding.PEM)
        pem = sign_proxy_request(csr_pem, self.user.cert_pem, self.user.key_pem, ca_pem)
        proxy, user, ca = certs(pem)
        self.assertEqual(user, self.user.cert)
        self.assertEqual(ca, self.ca.cert)
        self.assertEqual(proxy.issuer, user.subject)
        self.assertTrue(pem.startswith(b"-----BEGIN CERTIFICATE-----"))
        self.assertTrue(pem.endswith(ca_pem))

    def test_proxy_signs_a_further_proxy(self):
        """When the signer is itself a proxy, the new proxy is signed by the proxy's key, one CN deeper."""
        first = testx509.make_proxy(self.user)
        (second, signer, user), _ = self.sign(signer=first)
        self.assertEqual(signer, first.cert)
        self.assertEqual(user, self.user.cert)
        verify_signature(second, first.key.public_key())
        self.assertEqual(second.issuer, first.cert.subject)
        self.assertEqual(list(second.subject.rdns)[:-1], list(first.cert.subject.rdns))
        self.assertEqual(len(second.subject.rdns), len(self.user.cert.subject.rdns) + 2)
        self.assertLessEqual(second.not_valid_after_utc, first.cert.not_valid_after_utc)

    def test_openssl_accepts_the_chain_as_proxies(self):
        """When OpenSSL is allowed proxy certificates, it verifies proxy -> proxy -> user -> CA; otherwise it refuses."""
        first = testx509.make_proxy(self.user)
        (second, *chain), _ = self.sign(signer=first)

        def verify(flags):
            store = crypto.X509Store()
            store.add_cert(crypto.X509.from_cryptography(self.ca.cert))
            if flags:
                store.set_flags(flags)
            context = crypto.X509StoreContext(
                store,
                crypto.X509.from_cryptography(second),
                [crypto.X509.from_cryptography(cert) for cert in chain],
            )
            context.verify_certificate()

        verify(crypto.X509StoreFlags.ALLOW_PROXY_CERTS)
        with self.assertRaises(crypto.X509StoreContextError):
            verify(0)

    def test_ec_credentials(self):
        """When the user's key and the request's key are EC, the proxy is made all the same."""
        user = testx509.make_user(self.ca, "Elliptic User", key_kind="ec")
        csr_pem, request_key = make_request(key=ec.generate_private_key(ec.SECP256R1()))
        proxy, _ = certs(sign_proxy_request(csr_pem, user.cert_pem, user.key_pem))
        verify_signature(proxy, user.key.public_key())
        usage = proxy.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertFalse(usage.key_encipherment)

    def test_tampered_request_refused(self):
        """When the request was altered after it was signed, it is refused."""
        csr_pem, _ = make_request(subject="Dummy")
        der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
        at = der.index(b"Dummy")
        der[at : at + 5] = b"Evil!"
        tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
        with self.assertRaises(DelegationError) as caught:
            sign_proxy_request(tampered, self.user.cert_pem, self.user.key_pem)
        self.assertIn("signature", str(caught.exception))

    def test_garbage_request_refused(self):
        """When the request is not a PEM CSR, it is refused."""
        with self.assertRaises(DelegationError):
            sign_proxy_request(b"<html>proxy error</html>", self.user.cert_pem, self.user.key_pem)

    def test_foreign_key_refused(self):
        """When the key does not belong to the certificate, nothing is signed."""
        other = testx509.make_user(self.ca, "Mallory")
        csr_pem, _ = make_request()
        with self.assertRaises(DelegationError) as caught:
            sign_proxy_request(csr_pem, self.user.cert_pem, other.key_pem)
        self.assertIn("does not belong", str(caught.exception))

    def test_expired_signer_refused(self):
        """When the signing certificate has expired, nothing is signed."""
        csr_pem, _ = make_request()
        later = self.user.cert.not_valid_after_utc + datetime.timedelta(seconds=1)
        with self.assertRaises(DelegationError) as caught:
            sign_proxy_request(csr_pem, self.user.cert_pem, self.user.key_pem, now=later)
        self.assertIn("expired", str(caught.exception))

    def test_key_in_certificate_pem_not_sent(self):
        """When the signer is given as a whole proxy file (with its key), the key is not copied into the chain."""
        first = testx509.make_proxy(self.user)
        csr_pem, _ = make_request()
        pem = sign_proxy_request(csr_pem, first.proxy_file_pem, first.key_pem)
        self.assertNotIn(b"PRIVATE KEY", pem)
        self.assertEqual(certs(pem)[1:], [first.cert, self.user.cert])

    def test_nonpositive_lifetime_refused(self):
        """When the wanted lifetime is not positive, nothing is signed."""
        csr_pem, _ = make_request()
        with self.assertRaises(DelegationError):
            sign_proxy_request(csr_pem, self.user.cert_pem, self.user.key_pem, lifetime_seconds=0)


class RemainingLifetimeTests(unittest.SynchronousTestCase):
    """remaining_lifetime counts down to the first certificate's notAfter."""

    def setUp(self):
        self.ca = testx509.make_ca()
        self.user = testx509.make_user(self.ca, lifetime_seconds=7200)
        self.end = self.user.cert.not_valid_after_utc

    def test_datetime_now(self):
        """When now is a datetime, the seconds left until notAfter are returned."""
        self.assertEqual(remaining_lifetime(self.user.cert_pem, now=self.end - datetime.timedelta(seconds=90)), 90.0)

    def test_posix_now(self):
        """When now is POSIX seconds (a Clock's seconds()), the same count is returned."""
        self.assertEqual(remaining_lifetime(self.user.cert_pem, now=self.end.timestamp() - 30), 30.0)

    def test_expired_is_negative(self):
        """When the certificate has expired, the result is negative."""
        self.assertEqual(remaining_lifetime(self.user.cert_pem, now=self.end + datetime.timedelta(seconds=5)), -5.0)

    def test_wall_clock(self):
        """When no now is given, the wall clock is used."""
        left = remaining_lifetime(self.user.cert_pem)
        self.assertTrue(7000 < left <= 7200, left)

    def test_first_certificate_counts(self):
        """When given a chain, the first certificate's end counts, even if a later one ends sooner."""
        proxy = testx509.make_proxy(self.user, lifetime_seconds=600)
        chain = proxy.cert_pem + self.user.cert_pem
        now = datetime.datetime.now(UTC)
        self.assertAlmostEqual(
            remaining_lifetime(chain, now=now), (proxy.cert.not_valid_after_utc - now).total_seconds()
        )

    def test_no_certificate(self):
        """When the PEM holds no certificate, DelegationError says so."""
        with self.assertRaises(DelegationError):
            remaining_lifetime(b"nothing here")


class LoadCredentialTests(unittest.SynchronousTestCase):
    """load_credential reads a certificate and key pair, or one proxy file."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.ca = testx509.make_ca()
        self.user = testx509.make_user(self.ca)
        self.proxy = testx509.make_proxy(self.user)
        self.paths = testx509.write_credentials(self.dir, ca=self.ca, user=self.user, proxy=self.proxy)

    def test_separate_files(self):
        """When given a certificate file and a key file, they are returned with an empty chain."""
        cert_pem, key_pem, chain_pem = load_credential(self.paths.user_cert, self.paths.user_key)
        self.assertEqual(cert_pem, self.user.cert_pem)
        self.assertEqual(key_pem, self.user.key_pem)
        self.assertEqual(chain_pem, b"")

    def test_certificate_file_with_chain(self):
        """When the certificate file also holds its chain, the chain comes back separately."""
        path = os.path.join(self.dir, "withchain.pem")
        with open(path, "wb") as handle:
            handle.write(self.proxy.cert_pem + self.user.cert_pem)
        cert_pem, key_pem, chain_pem = load_credential(path, self.paths.proxy)
        self.assertEqual(cert_pem, self.proxy.cert_pem)
        self.assertEqual(key_pem, self.proxy.key_pem)
        self.assertEqual(chain_pem, self.user.cert_pem)

    def test_proxy_file(self):
        """When given one proxy file, its certificate, key and chain come back apart."""
        cert_pem, key_pem, chain_pem = load_credential(self.paths.proxy)
        self.assertEqual(cert_pem, self.proxy.cert_pem)
        self.assertEqual(key_pem, self.proxy.key_pem)
        self.assertEqual(chain_pem, self.user.cert_pem)
        self.assertEqual(os.stat(self.paths.proxy).st_mode & 0o777, 0o600)

    def test_loaded_proxy_signs(self):
        """When a loaded proxy file signs a request, the chain is new proxy, proxy, user."""
        csr_pem, _ = make_request()
        pem = sign_proxy_request(csr_pem, *load_credential(self.paths.proxy))
        self.assertEqual(certs(pem)[1:], [self.proxy.cert, self.user.cert])

    def test_legacy_rsa_key_format(self):
        """When the key is in the traditional 'RSA PRIVATE KEY' form, it is read too."""
        path = os.path.join(self.dir, "oldkey.pem")
        traditional = self.user.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        with open(path, "wb") as handle:
            handle.write(traditional)
        _, key_pem, _ = load_credential(self.paths.user_cert, path)
        self.assertEqual(key_pem, traditional)

    def test_missing_key(self):
        """When a lone file holds no key, DelegationError names the file."""
        with self.assertRaises(DelegationError) as caught:
            load_credential(self.paths.user_cert)
        self.assertIn("usercert.pem", str(caught.exception))

    def test_missing_certificate(self):
        """When the certificate file holds no certificate, DelegationError names the file."""
        with self.assertRaises(DelegationError) as caught:
            load_credential(self.paths.user_key, self.paths.user_key)
        self.assertIn("userkey.pem", str(caught.exception))


class ServerSideChecksTests(unittest.SynchronousTestCase):
    """new_proxy_request and check_delegated_proxy do what FTS3 does with a delegation."""

    @classmethod
    def setUpClass(cls):
        cls.ca = testx509.make_ca()
        cls.user = testx509.make_user(cls.ca)
        cls.csr_pem, cls.request_key_pem = new_proxy_request()

    def test_round_trip(self):
        """When the client signs the server's request, the server accepts the chain and learns its end."""
        pem = sign_proxy_request(self.csr_pem, self.user.cert_pem, self.user.key_pem, lifetime_seconds=600)
        end = check_delegated_proxy(pem, self.request_key_pem)
        self.assertEqual(end, certs(pem)[0].not_valid_after_utc)

    def test_request_looks_like_fts(self):
        """When the server makes a request, it is a valid CSR with the O=Dummy placeholder subject."""
        csr = x509.load_pem_x509_csr(self.csr_pem)
        self.assertTrue(csr.is_signature_valid)
        self.assertEqual(csr.subject.rfc4514_string(), "O=Dummy")

    def test_lone_proxy_refused(self):
        """When the chain holds only the proxy, it is malformed."""
        pem = sign_proxy_request(self.csr_pem, self.user.cert_pem, self.user.key_pem)
        with self.assertRaises(DelegationError):
            check_delegated_proxy(certs(pem)[0].public_bytes(serialization.Encoding.PEM), self.request_key_pem)

    def test_other_request_key_refused(self):
        """When the proxy carries another key than the request's, it is refused."""
        csr_pem, _ = make_request()
        pem = sign_proxy_request(csr_pem, self.user.cert_pem, self.user.key_pem)
        with self.assertRaises(DelegationError) as caught:
            check_delegated_proxy(pem, self.request_key_pem)
        self.assertIn("public key", str(caught.exception))

    def test_wrong_issuer_refused(self):
        """When the next certificate is not the proxy's signer, the chain is refused."""
        other = testx509.make_user(self.ca, "Someone Else")
        pem = sign_proxy_request(self.csr_pem, self.user.cert_pem, self.user.key_pem)
        forged = certs(pem)[0].public_bytes(serialization.Encoding.PEM) + other.cert_pem
        with self.assertRaises(DelegationError):
            check_delegated_proxy(forged, self.request_key_pem)

    def test_bad_subject_refused(self):
        """When the proxy's subject is not its issuer's plus one CN, the chain is refused."""
        request_key = serialization.load_pem_private_key(self.request_key_pem, None)
        now = datetime.datetime.now(UTC)
        bogus = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a proxy of anyone")]))
            .issuer_name(self.user.cert.subject)
            .public_key(request_key.public_key())
            .serial_number(7)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(hours=1))
            .sign(self.user.key, hashes.SHA256())
        )
        pem = bogus.public_bytes(serialization.Encoding.PEM) + self.user.cert_pem
        with self.assertRaises(DelegationError) as caught:
            check_delegated_proxy(pem, self.request_key_pem)
        self.assertIn("plus one CN", str(caught.exception))


class TestCredentialFactoryTests(unittest.SynchronousTestCase):
    """transferd.testing.x509 writes credentials in the layouts grid tools read."""

    def test_write_all(self):
        """When all credentials are written, the files exist, keys are private and the CA dir is hashed."""
        directory = os.path.abspath(self.mktemp())
        ca = testx509.make_ca()
        user = testx509.make_user(ca)
        host = testx509.make_host(ca, "localhost")
        paths = testx509.write_credentials(directory, ca=ca, user=user, proxy=testx509.make_proxy(user), host=host)
        for path in (paths.user_key, paths.proxy, paths.host_key):
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        hashed = os.listdir(paths.ca_dir)
        self.assertEqual(len(hashed), 1)
        self.assertTrue(hashed[0].endswith(".0"))
        with open(paths.host_cert, "rb") as handle:
            host_cert = certs(handle.read())[0]
        names = host_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("localhost", names.get_values_for_type(x509.DNSName))
        verify_signature(host_cert, ca.key.public_key())
