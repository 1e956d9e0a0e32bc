"""X.509 proxy delegation to FTS3 (RFC 3820 proxy certificates).

FTS3 transfers on behalf of a user with a proxy of the user's credential that
the user *delegates* to it; FTS3 never sees the user's private key:

1. the client GETs ``/delegation/{id}/request``: FTS3 makes a fresh key pair,
   keeps the private half and answers a PEM certificate signing request
   (CSR) for the public half;
2. the client signs that CSR with its own credential (a user certificate and
   key, or an existing proxy and its key), producing a proxy certificate
   (:func:`sign_proxy_request`);
3. the client PUTs the PEM chain -- the new proxy, then the signer's
   certificate, then the signer's chain -- to ``/delegation/{id}/credential``.
   FTS3 checks that the proxy carries the public key of the request, is
   signed by the next certificate of the chain, and that its subject is the
   issuer's subject plus one trailing CN (:func:`check_delegated_proxy` does
   the same checks, for fakes and tests).

A proxy certificate, as RFC 3820 and OpenSSL's proxy support want it:

* subject = issuer's subject + one ``CN`` (here the proxy's serial number,
  in decimal, as Globus does); issuer = the signer's subject;
* the critical proxyCertInfo extension (1.3.6.1.5.5.7.1.14) with the
  policy language id-ppl-inheritAll (1.3.6.1.5.5.7.21.1): the proxy holds
  all of the signer's rights;
* basicConstraints cA=FALSE and keyUsage digitalSignature (+
  keyEncipherment for RSA), both critical; no keyCertSign, no
  nonRepudiation; no alternative names;
* a validity that never reaches past the signer's nor its chain's.

This module is pure (no I/O, no reactor) except :func:`load_credential`,
which reads files.
"""

import datetime
import re
import secrets
from typing import List, Optional, Tuple, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "PROXY_CERT_INFO_OID",
    "INHERIT_ALL_OID",
    "DelegationError",
    "sign_proxy_request",
    "remaining_lifetime",
    "load_credential",
    "new_proxy_request",
    "check_delegated_proxy",
    "is_proxy",
    "proxy_policy_language",
    "end_entity",
]

#: id-pe-proxyCertInfo (RFC 3820 section 3.8)
PROXY_CERT_INFO_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14")
#: id-ppl-inheritAll (RFC 3820 section 3.8.2)
INHERIT_ALL_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.21.1")

#: proxies start this much before "now", for peers whose clocks lag a little
CLOCK_SKEW = datetime.timedelta(minutes=5)

_UTC = datetime.timezone.utc
_SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class DelegationError(ValueError):
    """A credential, request or delegated chain that cannot be used, with the reason in words."""


# --- DER helpers for proxyCertInfo -------------------------------------------------------------
#
# ProxyCertInfoExtension ::= SEQUENCE {
#     pCPathLenConstraint  INTEGER (0..MAX) OPTIONAL,
#     proxyPolicy          SEQUENCE { policyLanguage OBJECT IDENTIFIER,
#                                     policy         OCTET STRING OPTIONAL } }
# cryptography knows no such extension, so it is built and read here as raw DER.


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _der_oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(arc) for arc in oid.dotted_string.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def _der_read(data: bytes, offset: int) -> Tuple[int, bytes, int]:
    """One TLV at offset: (tag, content, offset after it)."""
    if offset + 2 > len(data):
        raise DelegationError("truncated DER in proxyCertInfo")
    tag, first = data[offset], data[offset + 1]
    offset += 2
    if first & 0x80:
        count = first & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise DelegationError("bad DER length in proxyCertInfo")
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    else:
        length = first
    if offset + length > len(data):
        raise DelegationError("truncated DER in proxyCertInfo")
    return tag, data[offset : offset + length], offset + length


def _oid_from_der(content: bytes) -> str:
    arcs, value = [], 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        raise DelegationError("empty OID in proxyCertInfo")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first] + arcs[1:])


def _proxy_cert_info(path_length: Optional[int] = None) -> bytes:
    policy = _der(0x30, _der_oid(INHERIT_ALL_OID))
    parts = b""
    if path_length is not None:
        parts += _der(0x02, path_length.to_bytes((path_length.bit_length() + 8) // 8, "big"))
    return _der(0x30, parts + policy)


def _parse_proxy_cert_info(value: bytes) -> Tuple[Optional[int], str]:
    """(pCPathLenConstraint or None, policy language OID) of a proxyCertInfo value."""
    tag, content, end = _der_read(value, 0)
    if tag != 0x30 or end != len(value):
        raise DelegationError("proxyCertInfo is not a DER SEQUENCE")
    path_length = None
    tag, inner, offset = _der_read(content, 0)
    if tag == 0x02:
        path_length = int.from_bytes(inner, "big", signed=True)
        tag, inner, offset = _der_read(content, offset)
    if tag != 0x30:
        raise DelegationError("proxyCertInfo has no proxyPolicy")
    tag, oid, _ = _der_read(inner, 0)
    if tag != 0x06:
        raise DelegationError("proxyPolicy has no policy language")
    return path_length, _oid_from_der(oid)


def is_proxy(cert: x509.Certificate) -> bool:
    """Whether cert is an RFC 3820 proxy certificate (it has proxyCertInfo)."""
    try:
        cert.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
    except x509.ExtensionNotFound:
        return False
    return True


def proxy_policy_language(cert: x509.Certificate) -> Optional[str]:
    """The dotted policy language OID of a proxy's proxyCertInfo, or None for a non-proxy."""
    try:
        extension = cert.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
    except x509.ExtensionNotFound:
        return None
    return _parse_proxy_cert_info(extension.value.value)[1]


def end_entity(chain: List[x509.Certificate]) -> x509.Certificate:
    """The first certificate of a chain that is not a proxy: the identity the proxies speak for."""
    for cert in chain:
        if not is_proxy(cert):
            return cert
    raise DelegationError("the chain holds only proxy certificates")


# --- PEM handling --------------------------------------------------------------------------------

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


def _pem_blocks(data: bytes) -> List[Tuple[str, bytes]]:
    return [(match.group(1).decode("ascii"), match.group(0)) for match in _PEM_BLOCK.finditer(data)]


def _certificates(pem: bytes, what: str) -> List[x509.Certificate]:
    blocks = [block for kind, block in _pem_blocks(pem) if kind in ("CERTIFICATE", "X509 CERTIFICATE")]
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        raise DelegationError(f"{what} holds a certificate that cannot be read: {e}") from None


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _as_datetime(now: Union[None, float, int, datetime.datetime]) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(_UTC)
    if isinstance(now, datetime.datetime):
        return now if now.tzinfo else now.replace(tzinfo=_UTC)
    return datetime.datetime.fromtimestamp(now, _UTC)


def _signature_hash(key) -> Optional[hashes.HashAlgorithm]:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _same_public_key(one, other) -> bool:
    form = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return one.public_bytes(*form) == other.public_bytes(*form)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether issuer is cert's issuer by name and its key made cert's signature."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- the client side: sign the server's request ----------------------------------------------------


def sign_proxy_request(
    csr_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes = b"",
    lifetime_seconds: int = 43200,
    *,
    now: Union[None, float, datetime.datetime] = None,
    password: Optional[bytes] = None,
) -> bytes:
    """Sign an FTS3 delegation request: the PEM chain to PUT to /delegation/{id}/credential.

    csr_pem: the request FTS3 answered to GET /delegation/{id}/request.
    cert_pem, key_pem: the signer, a user (or robot) certificate or a proxy,
    and its private key (password: the key's passphrase, if encrypted).
    chain_pem: the signer's own chain (for a proxy: the certificates it was
    delegated from), sent after the signer's certificate. Only certificates
    are sent: a private key found among them (a whole proxy file given as
    cert_pem) is left out.
    lifetime_seconds: wanted lifetime; the proxy never outlives the signer
    nor any certificate of its chain.

    Returns the new proxy certificate, then cert_pem's certificate, then the
    chain, all PEM. Raises DelegationError when the request's signature does
    not verify, the key does not belong to the certificate, or the signer
    has expired.
    """
    if lifetime_seconds <= 0:
        raise DelegationError(f"a proxy lifetime must be positive, not {lifetime_seconds}s")
    try:
        request = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise DelegationError(f"the delegation request is not a PEM certificate request: {e}") from None
    if not request.is_signature_valid:
        raise DelegationError("the delegation request's signature does not verify: refusing to sign it")

    signers = _certificates(cert_pem, "the certificate file")
    if not signers:
        raise DelegationError("no certificate found to sign the delegation request with")
    signer = signers[0]
    chain = signers[1:] + _certificates(chain_pem, "the certificate chain")
    try:
        key = serialization.load_pem_private_key(key_pem, password=password)
    except (ValueError, TypeError) as e:
        raise DelegationError(f"the private key cannot be read: {e}") from None
    if not _same_public_key(key.public_key(), signer.public_key()):
        raise DelegationError("the private key does not belong to the signing certificate")
    if not isinstance(key, _SIGNING_KEYS):
        raise DelegationError(f"cannot sign with a {type(key).__name__}")

    moment = _as_datetime(now)
    lineage = [signer] + chain
    not_after = min([moment + datetime.timedelta(seconds=lifetime_seconds)] + [c.not_valid_after_utc for c in lineage])
    not_before = max([moment - CLOCK_SKEW] + [c.not_valid_before_utc for c in lineage])
    if not_after <= moment:
        raise DelegationError(
            f"the signing credential {signer.subject.rfc4514_string()} expired at {not_after.isoformat()}"
        )
    if not_before >= not_after:
        raise DelegationError("the signing credential is not valid yet")

    serial = secrets.randbits(63) | (1 << 62)  # positive, never zero, a stable width
    proxy_cn = x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, str(serial))])
    subject = x509.Name(list(signer.subject.rdns) + [proxy_cn])
    public_key = request.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.UnrecognizedExtension(PROXY_CERT_INFO_OID, _proxy_cert_info()), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    try:
        ski = signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key())
    builder = builder.add_extension(aki, critical=False)
    proxy = builder.sign(key, _signature_hash(key))
    return b"".join(_pem(cert) for cert in [proxy] + lineage)


def remaining_lifetime(cert_pem: bytes, now: Union[None, float, datetime.datetime] = None) -> float:
    """Seconds until the first certificate of cert_pem expires (negative once it has).

    now: a datetime or POSIX seconds (e.g. a Clock's seconds()); default: the wall clock.
    """
    certs = _certificates(cert_pem, "the credential")
    if not certs:
        raise DelegationError("no certificate found in the credential")
    return (certs[0].not_valid_after_utc - _as_datetime(now)).total_seconds()


def load_credential(cert_path: str, key_path: Optional[str] = None) -> Tuple[bytes, bytes, bytes]:
    """Read an X.509 credential: (cert_pem, key_pem, chain_pem).

    Either a certificate file (the certificate, optionally followed by its
    chain) and a key file, or -- key_path None -- one proxy file holding the
    proxy certificate, its private key and the chain, in any order after the
    first certificate (the layout of /tmp/x509up_u<uid> and of FTS3's stored
    proxies). Keys are returned as found (an encrypted key stays encrypted).
    """
    with open(cert_path, "rb") as handle:
        cert_data = handle.read()
    certs = _certificates(cert_data, cert_path)
    if not certs:
        raise DelegationError(f"{cert_path} holds no certificate")
    if key_path is None:
        key_source, key_data = cert_path, cert_data
    else:
        key_source = key_path
        with open(key_path, "rb") as handle:
            key_data = handle.read()
    keys = [block for kind, block in _pem_blocks(key_data) if kind.endswith("PRIVATE KEY")]
    if not keys:
        raise DelegationError(f"{key_source} holds no private key")
    if len(keys) > 1:
        raise DelegationError(f"{key_source} holds {len(keys)} private keys; expected one")
    key_pem = keys[0] if keys[0].endswith(b"\n") else keys[0] + b"\n"
    return _pem(certs[0]), key_pem, b"".join(_pem(cert) for cert in certs[1:])


# --- the server side: what FTS3 does, for fakes and tests -------------------------------------------


def new_proxy_request(key_size: int = 2048) -> Tuple[bytes, bytes]:
    """A fresh delegation request, as FTS3 makes for GET /delegation/{id}/request: (csr_pem, key_pem).

    The subject is a placeholder (FTS3 uses O=Dummy): the signer replaces it.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Dummy")]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return request.public_bytes(serialization.Encoding.PEM), key_pem


def check_delegated_proxy(chain_pem: bytes, request_key_pem: bytes, now=None) -> datetime.datetime:
    """Check a chain PUT to /delegation/{id}/credential as FTS3 does; return the proxy's notAfter (UTC).

    The chain must hold the proxy and at least its issuer; the proxy must
    carry the public key of the request (request_key_pem: the key kept when
    the request was made), be signed by the next certificate, have that
    certificate's subject plus one trailing CN as subject, and not be
    expired. Raises DelegationError saying what is wrong.
    """
    certs = _certificates(chain_pem, "the delegated chain")
    if len(certs) < 2:
        raise DelegationError("malformed proxy: expected the proxy followed by at least its issuer")
    proxy, issuer = certs[0], certs[1]
    try:
        request_key = serialization.load_pem_private_key(request_key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise DelegationError(f"the request's key cannot be read: {e}") from None
    if not _same_public_key(proxy.public_key(), request_key.public_key()):
        raise DelegationError("the proxy does not carry the public key of the delegation request")
    if proxy.issuer != issuer.subject:
        raise DelegationError("the proxy's issuer is not the next certificate of the chain")
    if not _signed_by(proxy, issuer):
        raise DelegationError("the proxy is not signed by the next certificate of the chain")
    rdns = list(proxy.subject.rdns)
    if rdns[:-1] != list(issuer.subject.rdns):
        raise DelegationError(
            f"the proxy subject {proxy.subject.rfc4514_string()} is not its issuer's "
            f"{issuer.subject.rfc4514_string()} plus one CN"
        )
    last = list(rdns[-1]) if rdns else []
    if len(last) != 1 or last[0].oid != NameOID.COMMON_NAME:
        raise DelegationError("the proxy subject does not end with a single CN")
    if proxy.not_valid_after_utc <= _as_datetime(now):
        raise DelegationError(f"the proxy expired at {proxy.not_valid_after_utc.isoformat()}")
    return proxy.not_valid_after_utc
