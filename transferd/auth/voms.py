"""VOMS attribute certificates: the VO groups and roles (FQANs) a grid proxy carries.

voms-proxy-init puts RFC 5755 attribute certificates (ACs), signed by a VOMS
server, in a non-critical extension of the proxy (VOMS_EXTENSION): a
SEQUENCE OF SEQUENCE OF AttributeCertificate.  Each AC names its holder (the
user certificate, by issuer DN and serial number), its issuer (the VOMS
server's DN), its validity, and one attribute VOMS_ATTRIBUTE (IetfAttrSyntax):
a policy authority "vo://host:port" and the FQANs, e.g.
"/meerkat/Role=production/Capability=NULL".  pyasn1-modules' RFC 5755 module
decodes them.

An AC is believed (VOMSTrust.fqans) only when all of these hold; otherwise it
is ignored and the proxy still authenticates its user, without FQANs:
* it is signed (RSA or ECDSA with SHA-256 or better) by the key of a
  configured VOMS server certificate ([auth] voms_dir) whose subject is the
  AC's issuer and which is valid now;
* a certificate in voms_dir/<vo>/ speaks for VO <vo> only (one directly in
  voms_dir for any VO), and every FQAN lies in the AC's VO;
* it is valid now; its holder is the end-entity certificate of the chain.
"""

import datetime
import os

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pyasn1.codec.der import decoder, encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc5280, rfc5755
from twisted.logger import Logger

from transferd.auth.x509 import end_entity
from transferd.tls import pem_blocks

VOMS_EXTENSION = x509.ObjectIdentifier("1.3.6.1.4.1.8005.100.100.5")
VOMS_ATTRIBUTE = univ.ObjectIdentifier("1.3.6.1.4.1.8005.100.100.4")

# signatureAlgorithm -> (hash, key type): SHA-1 and weaker are refused
SIGNATURES = {
    "1.2.840.113549.1.1.11": (hashes.SHA256, rsa.RSAPublicKey),
    "1.2.840.113549.1.1.12": (hashes.SHA384, rsa.RSAPublicKey),
    "1.2.840.113549.1.1.13": (hashes.SHA512, rsa.RSAPublicKey),
    "1.2.840.10045.4.3.2": (hashes.SHA256, ec.EllipticCurvePublicKey),
    "1.2.840.10045.4.3.3": (hashes.SHA384, ec.EllipticCurvePublicKey),
    "1.2.840.10045.4.3.4": (hashes.SHA512, ec.EllipticCurvePublicKey),
}

_UTC = datetime.timezone.utc


class VOMSError(ValueError):
    """An AC is malformed, or not to be believed; the message says why."""


class _ACs(univ.SequenceOf):
    """The VOMS extension's value: SEQUENCE OF SEQUENCE OF AttributeCertificate, each kept as its DER."""

    componentType = univ.SequenceOf(componentType=univ.Any())


class AttributeCertificate:
    """One VOMS AC, decoded (not yet verified)."""

    def __init__(self, der):
        try:
            ac, rest = decoder.decode(der, asn1Spec=rfc5755.AttributeCertificate())
        except PyAsn1Error as error:
            raise VOMSError(f"an attribute certificate cannot be decoded: {error}") from None
        if rest:
            raise VOMSError("an attribute certificate has trailing bytes")
        info = ac["acinfo"]
        self.signed = _first_element(der)  # acinfo as sent: the bytes the VOMS server signed
        self.algorithm = str(ac["signatureAlgorithm"]["algorithm"])
        self.signature = ac["signatureValue"].asOctets()
        if int(info["version"]) != 1:
            raise VOMSError("an attribute certificate is not of version 2")
        self.issuer_der = _directory_name(info["issuer"]["v2Form"]["issuerName"], "issuer")
        base = info["holder"]["baseCertificateID"]
        if not base.isValue:
            raise VOMSError("an attribute certificate names no holder certificate (baseCertificateID)")
        self.holder_issuer_der = _directory_name(base["issuer"], "holder")
        self.holder_serial = int(base["serial"])
        period = info["attrCertValidityPeriod"]
        self.not_before = period["notBeforeTime"].asDateTime.astimezone(_UTC)
        self.not_after = period["notAfterTime"].asDateTime.astimezone(_UTC)
        self.vo, self.authority, self.fqans = _voms_attribute(info["attributes"])

    def check(self, servers, holder, now):
        """Raise VOMSError unless servers (VOMSServer list) vouch for this AC, for holder, at now (datetime)."""
        if not self.not_before <= now <= self.not_after:
            raise VOMSError(f"its validity ({self.not_before:%Y-%m-%d %H:%M:%S} to "
                            f"{self.not_after:%Y-%m-%d %H:%M:%S} UTC) does not include now")
        outside = [fqan for fqan in self.fqans if fqan.split("/")[1:2] != [self.vo]]
        if outside:
            raise VOMSError(f"it claims {outside[0]}, outside its VO {self.vo}")
        if self.holder_issuer_der != holder.issuer.public_bytes() or self.holder_serial != holder.serial_number:
            raise VOMSError("it was issued for another certificate than the client's")
        signature = SIGNATURES.get(self.algorithm)
        if signature is None:
            raise VOMSError(f"it is signed with algorithm {self.algorithm}; SHA-256 or better is required")
        candidates = [server for server in servers
                      if server.subject_der == self.issuer_der and server.speaks_for(self.vo)]
        if not candidates:
            raise VOMSError(f"its issuer is not a VOMS server configured for VO {self.vo} (voms_dir)")
        for server in candidates:
            if server.not_before <= now <= server.not_after and server.verifies(self, *signature):
                return
        raise VOMSError(f"its signature does not verify with the configured VOMS server certificates of {self.vo}")


def _tlv_length(der, offset):
    """(offset of the contents, their length) of the DER element starting at offset."""
    first = der[offset + 1]
    if first < 0x80:
        return offset + 2, first
    count = first & 0x7F
    return offset + 2 + count, int.from_bytes(der[offset + 2:offset + 2 + count], "big")


def _first_element(der):
    """The DER bytes of the first element inside the SEQUENCE der."""
    start, _ = _tlv_length(der, 0)
    contents, length = _tlv_length(der, start)
    return der[start:contents + length]


def _directory_name(names, what):
    """The DER of the directoryName among GeneralNames (pyasn1), to compare with cryptography's Name.public_bytes()."""
    for name in names:
        if name.getName() == "directoryName":
            return encoder.encode(name["directoryName"]["rdnSequence"])
    raise VOMSError(f"an attribute certificate's {what} is not a directory name")


def _voms_attribute(attributes):
    """(vo, policy authority, FQANs) from the AC's VOMS attribute."""
    for attribute in attributes:
        if attribute["type"] != VOMS_ATTRIBUTE:
            continue
        for value in attribute["values"]:
            try:
                syntax, _ = decoder.decode(bytes(value), asn1Spec=rfc5755.IetfAttrSyntax())
            except PyAsn1Error as error:
                raise VOMSError(f"the VOMS attribute cannot be decoded: {error}") from None
            authority = ""
            for name in syntax["policyAuthority"]:
                if name.getName() == "uniformResourceIdentifier":
                    authority = str(name["uniformResourceIdentifier"])
            vo = authority.partition("://")[0]
            if not vo:
                raise VOMSError(f"the VOMS attribute's policy authority {authority!r} names no VO (vo://host:port)")
            fqans = []
            for item in syntax["values"]:
                if item.getName() != "octets":
                    raise VOMSError("the VOMS attribute holds a value that is not an FQAN")
                fqans.append(item["octets"].asOctets().decode("utf-8", "replace"))
            return vo, authority, tuple(fqans)
    raise VOMSError("an attribute certificate carries no VOMS attribute")


def attribute_certificates(cert):
    """The ACs of one certificate's VOMS extension (none without it); VOMSError if it is malformed."""
    try:
        value = cert.extensions.get_extension_for_oid(VOMS_EXTENSION).value.value
    except x509.ExtensionNotFound:
        return []
    try:
        groups, rest = decoder.decode(value, asn1Spec=_ACs())
    except PyAsn1Error as error:
        raise VOMSError(f"the VOMS extension cannot be decoded: {error}") from None
    if rest:
        raise VOMSError("the VOMS extension has trailing bytes")
    return [AttributeCertificate(bytes(der)) for group in groups for der in group]


def chain_attribute_certificates(chain):
    """(end entity, the ACs of the chain's proxies): leaf first, the first proxy carrying a VOMS extension."""
    holder = end_entity(chain)
    if holder is None:
        return None, []
    for cert in chain:
        if cert is holder:
            break
        acs = attribute_certificates(cert)
        if acs:
            return holder, acs
    return holder, []


def credential_lifetime(cert_pem, now=None):
    """(seconds left, what limits it) of our own credential: its first certificate, or its ACs if they end sooner.

    For our own proxy towards FTS: a delegated proxy keeps the VOMS
    attributes of the chain it comes from, which may expire before the proxy.
    now: POSIX seconds (default: the wall clock, as certificates' validity
    is).  Nothing is verified: it is our own credential.
    """
    moment = datetime.datetime.now(_UTC) if now is None else datetime.datetime.fromtimestamp(now, _UTC)
    certs = [x509.load_pem_x509_certificate(block) for block in pem_blocks(cert_pem, (b"CERTIFICATE",))]
    if not certs:
        raise VOMSError("no certificate found in the credential")
    left, what = (certs[0].not_valid_after_utc - moment).total_seconds(), "the certificate"
    for cert in certs:
        for ac in attribute_certificates(cert):
            ac_left = (ac.not_after - moment).total_seconds()
            if ac_left < left:
                left, what = ac_left, f"the VOMS attributes of {ac.vo}"
    return left, what


class VOMSServer:
    """A VOMS server's certificate, trusted for one VO (or any, vo None)."""

    def __init__(self, cert, vo):
        self.cert = cert
        self.vo = vo
        self.subject_der = cert.subject.public_bytes()
        self.not_before = cert.not_valid_before_utc
        self.not_after = cert.not_valid_after_utc

    def speaks_for(self, vo):
        return self.vo is None or self.vo == vo

    def verifies(self, ac, hash_type, key_type):
        key = self.cert.public_key()
        if not isinstance(key, key_type):
            return False
        try:
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(ac.signature, ac.signed, padding.PKCS1v15(), hash_type())
            else:
                key.verify(ac.signature, ac.signed, ec.ECDSA(hash_type()))
        except InvalidSignature:
            return False
        return True


def load_voms_dir(directory):
    """The VOMSServers of a voms_dir: PEM certificates directly in it (any VO) or in <vo>/ (that VO).

    The .lsc files of the gLite layout (DN chains, for servers that send
    their certificate inside the AC) hold no certificate and are skipped.
    """
    servers = []
    for vo, path in _voms_files(directory):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        for block in pem_blocks(data, (b"CERTIFICATE",)):
            try:
                servers.append(VOMSServer(x509.load_pem_x509_certificate(block), vo))
            except ValueError:
                continue
    return servers


def _voms_files(directory):
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_dir():
            for inner in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if inner.is_file():
                    yield entry.name, inner.path
        elif entry.is_file():
            yield None, entry.path


def _stamp(directory):
    stamp = []
    for vo, path in _voms_files(directory):
        try:
            info = os.stat(path)
        except OSError:
            continue
        stamp.append((vo, path, info.st_ino, info.st_size, info.st_mtime_ns))
    return stamp


class VOMSTrust:
    """The configured VOMS servers ([auth] voms_dir), read again when the directory changes.

    clock: tells the time (ACs' validity) and spaces the directory checks
    (at most every check_interval seconds).
    """

    log = Logger()

    def __init__(self, directory, clock, check_interval=5.0):
        self.directory = directory
        self.clock = clock
        self.check_interval = check_interval
        self._stamp = _stamp(directory)
        self.servers = load_voms_dir(directory)
        self._next_check = clock.seconds() + check_interval

    def fqans(self, chain):
        """The FQANs of the chain's (leaf first, verified by TLS) believed ACs; ignored ones are logged."""
        try:
            holder, acs = chain_attribute_certificates(chain)
        except VOMSError as error:
            self.log.info("ignoring the VOMS attributes of a client: {reason}", reason=error)
            return ()
        if not acs:
            return ()
        self._refresh()
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), _UTC)
        believed = []
        for ac in acs:
            try:
                ac.check(self.servers, holder, now)
            except VOMSError as error:
                self.log.info("ignoring a VOMS attribute certificate of {vo} ({authority}): {reason}",
                              vo=ac.vo, authority=ac.authority, reason=error)
                continue
            believed.extend(ac.fqans)
        return tuple(believed)

    def _refresh(self):
        now = self.clock.seconds()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval
        try:
            stamp = _stamp(self.directory)
        except OSError as error:
            self.log.warn("keeping the VOMS servers read before: cannot read {directory}: {error}",
                          directory=self.directory, error=error.strerror)
            return
        if stamp != self._stamp:
            self.servers, self._stamp = load_voms_dir(self.directory), stamp
            self.log.info("VOMS servers reloaded from {directory}: {count} certificates",
                          directory=self.directory, count=len(self.servers))


def fqan_matches(fqans, pattern):
    """True when one of fqans is pattern or lies under it ("/meerkat" covers "/meerkat/Role=production/...")."""
    pattern = pattern.rstrip("/")
    return any(fqan == pattern or fqan.startswith(pattern + "/") for fqan in fqans)
