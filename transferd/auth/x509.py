"""X.509 client authentication on the API's TLS listener: who is asking, by certificate.

* ServerTLS: the listener's TLS side, for TLSMemoryBIOFactory(ServerTLS(...), False, site).
  Client certificates are verified by OpenSSL against a CA directory in the
  grid layout (/etc/grid-security/certificates: <hash>.0 CAs, <hash>.r0
  CRLs, as fetch-crl leaves them), CRLs checked for every CA (a CA without
  a current CRL refuses its clients: fail closed), RFC 3820 proxies allowed.
* peer_dn(request): the canonical DN of the client of a twisted.web request:
  the end entity of its verified chain, never a proxy's own subject;
  peer_chain(request): that verified chain (for its VOMS attributes).
* canonical_dn(name): the one format DNs are stored and compared in.
"""

import os
import re

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from transferd.fts.delegation import PROXY_CERT_INFO_OID
from transferd.interfaces import IReconfigurable
from transferd.tls import CredentialError, X509Credential

__all__ = ["ServerTLS", "peer_dn", "peer_chain", "peer_certificate", "canonical_dn", "end_entity", "PROXY_EXTENSION_OIDS"]

#: proxyCertInfo of RFC 3820, and of the pre-RFC Globus Toolkit 3 proxies
PROXY_EXTENSION_OIDS = (PROXY_CERT_INFO_OID, x509.ObjectIdentifier("1.3.6.1.4.1.3536.1.222"))

# how OpenSSL's directory lookup names a CA certificate: its subject hash, then a number
_HASHED_CA = re.compile(r"[0-9a-f]{8}\.[0-9]+\Z")

#: the longest chain accepted: root CA, intermediates, user, proxies of proxies
VERIFY_DEPTH = 16

#: forward-secret AEAD suites for TLS 1.2 (TLS 1.3 has only such suites)
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

# Store flags: check the CRL of every certificate in the chain, not only the
# client's.  OpenSSL 4 (checked with 4.0.3) still verifies RFC 3820 proxies,
# proxies of proxies included, but only with ALLOW_PROXY_CERTS (or the
# OPENSSL_ALLOW_PROXY_CERTS environment variable); without it a proxy fails
# with X509_V_ERR_PROXY_CERTIFICATES_NOT_ALLOWED.  With it OpenSSL also
# enforces the proxy rules: subject = issuer's subject + one CN, and a
# signature by the issuer's key.  Pre-RFC (GT3) proxies are refused: their
# critical extension is unknown to OpenSSL.
_STORE_FLAGS = (
    crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL | crypto.X509StoreFlags.ALLOW_PROXY_CERTS
)

_CODES = SSL.X509VerificationCodes
# Why OpenSSL refused a client certificate, in words, for the errors an operator meets with grid certificates
_REFUSALS = {
    _CODES.ERR_UNABLE_TO_GET_CRL: "there is no CRL for its CA in the CA directory (is fetch-crl running?)",
    _CODES.ERR_CRL_HAS_EXPIRED: "its CA's CRL has expired (is fetch-crl running?)",
    _CODES.ERR_CERT_REVOKED: "it has been revoked",
    _CODES.ERR_CERT_HAS_EXPIRED: "it has expired",
    _CODES.ERR_CERT_NOT_YET_VALID: "it is not valid yet",
    _CODES.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "its CA is not in the CA directory",
    _CODES.ERR_UNABLE_TO_GET_ISSUER_CERT: "its CA is not in the CA directory",
    _CODES.ERR_CERT_SIGNATURE_FAILURE: "its signature does not verify",
}
# ... and the others by their name in pyOpenSSL
_CODE_NAMES = {value: name for name, value in vars(_CODES).items() if name.startswith("ERR_")}

# OpenSSL's short names (OBJ_nid2sn), as X509_NAME_oneline writes them
_SHORT_NAMES = {
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.STREET_ADDRESS: "street",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.USER_ID: "UID",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.SURNAME: "SN",
    NameOID.GIVEN_NAME: "GN",
    NameOID.INITIALS: "initials",
    NameOID.GENERATION_QUALIFIER: "generationQualifier",
    NameOID.PSEUDONYM: "pseudonym",
    NameOID.TITLE: "title",
    NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.POSTAL_CODE: "postalCode",
    NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
    NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionC",
    NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: "jurisdictionST",
    NameOID.JURISDICTION_LOCALITY_NAME: "jurisdictionL",
    NameOID.UNSTRUCTURED_NAME: "unstructuredName",
}


def canonical_dn(name: x509.Name) -> str:
    """name in the grid's "oneline" slash form: "/DC=org/DC=example/OU=People/CN=Alice Example".

    This is the form FTS3, Rucio, VOMS, gridmap files and ACLs use, so a DN
    copied from any of them matches; for the usual (ASCII) names it is what
    `openssl x509 -noout -subject -nameopt compat` prints.  RDNs come most
    significant first, in the certificate's order (the reverse of RFC 4514);
    attributes have OpenSSL's short names (emailAddress, UID,
    serialNumber...), unknown ones their dotted OID; values are written as
    they are, unescaped, as the grid tools do.  The members of a multi-valued
    RDN are joined with "+", in the order DER gives them in a certificate
    (X509_NAME_oneline, which some tools call, writes "/" there and loses the
    grouping; such RDNs are rare in grid certificates).
    """
    return "".join("/" + "+".join(_attribute(attribute) for attribute in rdn) for rdn in name.rdns)


def _attribute(attribute: x509.NameAttribute) -> str:
    value = attribute.value
    if isinstance(value, bytes):  # a BIT STRING attribute, e.g. x500UniqueIdentifier
        value = "#" + value.hex()
    return f"{_SHORT_NAMES.get(attribute.oid, attribute.oid.dotted_string)}={value}"


def end_entity(chain):
    """The first certificate of chain (leaf first) that is not a proxy: whom the proxies speak for, or None."""
    for cert in chain:
        if not any(extension.oid in PROXY_EXTENSION_OIDS for extension in cert.extensions):
            return cert
    return None


def peer_dn(request):
    """The canonical DN of the client behind a twisted.web request, or None.

    None when the connection is not TLS or the client presented no
    certificate.  Only a verified chain is read (TLS made by ServerTLS with
    a CA directory; a failed verification ends the handshake), and the DN is
    the end entity's, so a proxy's extra CN never becomes an identity.
    """
    return peer_certificate(request)[0]


def peer_chain(request):
    """The verified certificate chain (leaf first, cryptography certificates) of request's client, or []."""
    return peer_certificate(request)[1]


def peer_certificate(request):
    """(DN, verified chain) of request's client; (None, []) without a verified client certificate.

    Kept on the HTTP channel: a keep-alive connection asks for every
    request, and its certificate cannot change (no renegotiation).
    """
    channel = request.channel
    if channel is None:  # the client has gone
        return None, []
    try:
        return channel._transferd_peer
    except AttributeError:
        pass
    get_handle = getattr(channel.transport, "getHandle", None)
    connection = get_handle() if get_handle is not None else None
    dn, chain = None, []
    if isinstance(connection, SSL.Connection):
        chain = connection.get_verified_chain(as_cryptography=True) or []
        cert = end_entity(chain)
        dn = canonical_dn(cert.subject) if cert is not None else None
    channel._transferd_peer = (dn, chain)
    return dn, chain


@implementer(IOpenSSLServerConnectionCreator, IReconfigurable)
class ServerTLS:
    """The TLS side of the API listener, verifying client certificates against a grid CA directory.

    cert_path: the server certificate, then its intermediates (sent as the
    chain); key_path: its key (None or "": in cert_path).  ca_path: a
    directory in the grid layout; without it no client certificate is asked
    for.  require_client_cert (with ca_path): refuse clients without a
    certificate; when False (bearer tokens are accepted too) a client may
    present none, but one that presents a certificate failing verification is
    refused all the same.

    OpenSSL's directory lookup keeps what it once loaded, so the CRLs fetch-crl
    rewrites every hour would never be seen: at most every check_interval
    seconds, when a client connects, the files of ca_path (and our own
    certificate and key, renewed in place) are looked at, and a new context
    made when they changed.  Unusable files raise CredentialError naming the
    file at construction; later, they are logged and the previous settings
    kept.  Sessions are never resumed, so every connection is checked
    against the current CRLs.
    """

    log = Logger()

    def __init__(self, cert_path, key_path=None, ca_path=None, require_client_cert=True, *, clock,
                 check_interval=5.0):
        self.credential = X509Credential(cert_path, key_path or None)
        self.ca_path = ca_path or None
        self.require_client_cert = require_client_cert
        self.clock = clock
        self.check_interval = check_interval
        if self.ca_path is not None and not os.path.isdir(self.ca_path):
            raise CredentialError(
                f"{self.ca_path} is not a CA directory (wanted: the grid layout, <hash>.0 CAs and <hash>.r0 CRLs)")
        try:
            ca_stamp = _directory_stamp(self.ca_path)
        except OSError as error:
            raise CredentialError(f"cannot read the CA directory {self.ca_path}: {error.strerror}") from None
        if ca_stamp is not None and not any(_HASHED_CA.match(name) for name, *_ in ca_stamp):
            raise CredentialError(
                f"no CA certificate named <hash>.0 in {self.ca_path}: run `openssl rehash` on it, or install"
                " the IGTF bundle there")
        self._loaded = self.credential.load()
        self._ca_stamp = ca_stamp
        self._context = self._make_context(self._loaded)
        self._next_check = clock.seconds() + check_interval

    def reconfigure(self, config):
        """A new [auth] x509_ca_path (SIGHUP): checked as at start (ConfigError), then used from the next connection."""
        from transferd.config import ConfigError

        ca_path = config.auth.x509_ca_path or None
        if (ca_path is None) != (self.ca_path is None):
            raise ConfigError("[auth] x509_ca_path: turning client certificates on or off needs a restart")
        if ca_path == self.ca_path:
            return
        try:
            ca_stamp = _directory_stamp(ca_path) if os.path.isdir(ca_path) else None
        except OSError as error:
            raise ConfigError(f"[auth] x509_ca_path: cannot read {ca_path}: {error.strerror}") from None
        if ca_stamp is None or not any(_HASHED_CA.match(name) for name, *_ in ca_stamp):
            raise ConfigError(f"[auth] x509_ca_path = {ca_path!r} holds no CA certificate named <hash>.0")
        previous, self.ca_path = self.ca_path, ca_path
        try:
            context = self._make_context(self._loaded)
        except SSL.Error as error:
            self.ca_path = previous
            raise ConfigError(f"[auth] x509_ca_path = {ca_path!r} cannot be used: {error}") from None
        self._context, self._ca_stamp = context, ca_stamp

    def serverConnectionForTLS(self, tlsProtocol):
        now = self.clock.seconds()
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            self._refresh()
        return SSL.Connection(self._context, None)

    def _refresh(self):
        try:
            loaded, ca_stamp = self.credential.load(), _directory_stamp(self.ca_path)
        except (CredentialError, OSError) as error:
            self.log.warn("keeping the current TLS settings: {error}", error=error)
            return
        if loaded is not self._loaded or ca_stamp != self._ca_stamp:
            self._context = self._make_context(loaded)
            self._loaded, self._ca_stamp = loaded, ca_stamp
            self.log.info("TLS settings reloaded from {cert} and {ca_path}", cert=self.credential.cert_path,
                          ca_path=self.ca_path)

    def _make_context(self, loaded):
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(TLS12_CIPHERS)
        context.set_options(
            SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
        # no session cache nor tickets: a resumed session would skip the CRL check
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_session_id(b"transferd")  # OpenSSL wants one whenever client certificates are verified
        context.use_certificate(loaded.tls_certificate.original.to_cryptography())
        context.use_privatekey(loaded.tls_certificate.privateKey.original.to_cryptography_key())
        for cert in loaded.tls_chain:
            context.add_extra_chain_cert(cert.to_cryptography())
        if self.ca_path is not None:
            mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if self.require_client_cert else 0)
            context.set_verify(mode, self._verified)
            context.set_verify_depth(VERIFY_DEPTH)
            context.load_verify_locations(None, self.ca_path)
            context.get_cert_store().set_flags(_STORE_FLAGS)
        return context

    def _verified(self, connection, cert, error, depth, ok):
        """OpenSSL's verdict on one certificate of a client's chain, unchanged; a refusal is logged."""
        if not ok:
            self.log.info(
                "refused a client: {subject} (depth {depth} of its chain): {reason}",
                reason=_REFUSALS.get(error) or _CODE_NAMES.get(error, f"OpenSSL verification error {error}"),
                depth=depth,
                subject=canonical_dn(cert.to_cryptography().subject),
                error=error,
            )
        return ok


def _directory_stamp(path):
    """What changes when a file of directory path is written, renamed over or removed; None without path."""
    if path is None:
        return None
    stamp = []
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                info = entry.stat()  # of a symbolic link's target, as OpenSSL reads it
            except OSError:
                continue  # a dangling link: OpenSSL cannot read it either
            stamp.append((entry.name, info.st_ino, info.st_size, info.st_mtime_ns))
    return sorted(stamp)
