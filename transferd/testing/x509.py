"""Throw-away X.509 credentials for tests and demos: a CA, users, hosts, RFC 3820 proxies.

    ca = make_ca()
    user = make_user(ca, "Alice Example")
    proxy = make_proxy(user)                       # signed by user's key
    second = make_proxy(proxy)                     # a proxy of the proxy
    host = make_host(ca, "localhost")              # for a TLS server on 127.0.0.1
    paths = write_credentials(directory, ca=ca, user=user, proxy=proxy)
    paths.proxy   # one file: proxy certificate, its key, then user certificate
    crl = make_crl(ca, revoked=[user])             # the CA's revocation list
    write_ca_dir(directory, cas=[ca], crls=[crl])  # <hash>.0 and <hash>.r0, as fetch-crl leaves them
    forged = make_forged_proxy(other_user, user)   # claims user's name, signed with other_user's key
    voms = make_voms_server(ca, "voms.example.org")               # a VOMS server's host certificate
    vproxy = make_voms_proxy(user, voms, "meerkat", ["/meerkat/Role=production/Capability=NULL"])
    write_voms_dir(directory, {"meerkat": [voms]})                # vomsdir/meerkat/<host>.pem

Everything is made in memory with `cryptography`; nothing here is fit for
anything but tests (keys are unencrypted, the CA is trusted by nobody).
"""

import dataclasses
import datetime
import ipaddress
import os
from typing import List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import univ, useful
from pyasn1_modules import rfc5280, rfc5755

from transferd.auth import voms as vomslib
from transferd.fts import delegation

_UTC = datetime.timezone.utc

#: the subject all test credentials start with, like a grid CA's namespace
BASE_SUBJECT = [
    x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "org"),
    x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "transferd-test"),
]


@dataclasses.dataclass
class Credential:
    """A certificate, its private key and the chain above it (not including the root CA).

    For a user certificate the chain is empty; for a proxy it is the
    certificates it was delegated from, nearest first.
    """

    cert: x509.Certificate
    key: object  # a cryptography private key
    chain: List[x509.Certificate] = dataclasses.field(default_factory=list)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def chain_pem(self) -> bytes:
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.chain)

    @property
    def proxy_file_pem(self) -> bytes:
        """The layout of a grid proxy file (/tmp/x509up_u<uid>): certificate, key, chain."""
        return self.cert_pem + self.key_pem + self.chain_pem

    @property
    def subject(self) -> x509.Name:
        return self.cert.subject


def new_key(kind: str = "rsa"):
    """A fresh private key: "rsa" (2048 bits, what grid tools expect) or "ec" (P-256, faster)."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key kind {kind!r}: 'rsa' or 'ec'")


def _window(now, lifetime_seconds):
    now = now or datetime.datetime.now(_UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(seconds=lifetime_seconds)


def _key_usage(**wanted):
    fields = dict(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    fields.update(wanted)
    return x509.KeyUsage(**fields)


def make_ca(name: str = "transferd test CA", lifetime_seconds: int = 10 * 86400, key_kind: str = "rsa", now=None):
    """A self-signed root CA."""
    key = new_key(key_kind)
    subject = x509.Name(BASE_SUBJECT + [x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before, not_after = _window(now, lifetime_seconds)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True, digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Credential(cert, key)


def _issue(ca: Credential, subject, key, not_before, not_after, extensions):
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(ca.key, hashes.SHA256())


def make_user(
    ca: Credential,
    name: str = "Test User",
    lifetime_seconds: int = 2 * 86400,
    key_kind: str = "rsa",
    now=None,
    organizational_unit: str = "Users",
):
    """A user certificate signed by ca: subject DC=org/DC=transferd-test/OU=<ou>/CN=<name>.

    Its key usage allows signing proxies (digitalSignature), as grid user
    certificates do.
    """
    key = new_key(key_kind)
    subject = x509.Name(
        BASE_SUBJECT
        + [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    not_before, not_after = _window(now, lifetime_seconds)
    not_after = min(not_after, ca.cert.not_valid_after_utc)
    cert = _issue(
        ca,
        subject,
        key,
        not_before,
        not_after,
        [
            (_key_usage(digital_signature=True, key_encipherment=True, content_commitment=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        ],
    )
    return Credential(cert, key)


def make_host(ca: Credential, hostname: str = "localhost", lifetime_seconds: int = 2 * 86400, key_kind="rsa", now=None):
    """A TLS server certificate signed by ca, valid for hostname, localhost and 127.0.0.1."""
    key = new_key(key_kind)
    subject = x509.Name(BASE_SUBJECT + [x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    names = {hostname, "localhost"}
    alt_names = [x509.DNSName(name) for name in sorted(names)] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    not_before, not_after = _window(now, lifetime_seconds)
    cert = _issue(
        ca,
        subject,
        key,
        not_before,
        min(not_after, ca.cert.not_valid_after_utc),
        [
            (_key_usage(digital_signature=True, key_encipherment=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            (x509.SubjectAlternativeName(alt_names), False),
        ],
    )
    return Credential(cert, key)


def make_proxy(signer: Credential, lifetime_seconds: int = 12 * 3600, key_kind: str = "rsa", now=None):
    """An RFC 3820 proxy of signer (a user credential or another proxy), made by the delegation code.

    It goes through the same path as a real delegation: a fresh key and CSR
    for it, signed with transferd.fts.delegation.sign_proxy_request.
    """
    key = new_key(key_kind)
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Dummy")]))
        .sign(key, hashes.SHA256())
    )
    chain_pem = delegation.sign_proxy_request(
        request.public_bytes(serialization.Encoding.PEM),
        signer.cert_pem,
        signer.key_pem,
        signer.chain_pem,
        lifetime_seconds=lifetime_seconds,
        now=now,
    )
    certs = x509.load_pem_x509_certificates(chain_pem)
    return Credential(certs[0], key, certs[1:])


def make_forged_proxy(
    signer: Credential,
    claimed: Credential,
    claimed_issuer: bool = True,
    lifetime_seconds: int = 12 * 3600,
    key_kind: str = "rsa",
    now=None,
):
    """A proxy that claims to speak for `claimed` but is signed with signer's key: a forgery.

    It is a genuine proxy of signer, renamed to claimed's subject plus the
    proxy's CN.  With claimed_issuer, its issuer (name and key identifier) is
    claimed's certificate, which is sent as the chain, as a thief holding
    only claimed's public certificate would; so the signature does not
    verify.  Without, its issuer is signer's certificate, sent as the chain:
    the signature verifies but the subject is not the issuer's plus one CN.
    """
    genuine = make_proxy(signer, lifetime_seconds=lifetime_seconds, key_kind=key_kind, now=now)
    issuer = claimed if claimed_issuer else signer
    subject = x509.Name(list(claimed.subject.rdns) + [genuine.cert.subject.rdns[-1]])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(genuine.key.public_key())
        .serial_number(genuine.cert.serial_number)
        .not_valid_before(genuine.cert.not_valid_before_utc)
        .not_valid_after(genuine.cert.not_valid_after_utc)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.cert.public_key()), critical=False)
    )
    for extension in genuine.cert.extensions:
        if not isinstance(extension.value, x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(extension.value, critical=extension.critical)
    cert = builder.sign(signer.key, hashes.SHA256())
    return Credential(cert, genuine.key, [issuer.cert] + issuer.chain)


def make_crl(ca: Credential, revoked=(), lifetime_seconds: int = 86400, now=None) -> x509.CertificateRevocationList:
    """ca's certificate revocation list, revoking the certificates of the credentials in revoked.

    It is valid from now - 5 min to now + lifetime_seconds; pass a now in the
    past for an expired list.
    """
    this_update, next_update = _window(now, lifetime_seconds)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.CRLNumber(int(this_update.timestamp())), critical=False)
    )
    for credential in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(credential.cert.serial_number)
            .revocation_date(this_update)
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def subject_hash(cert: x509.Certificate) -> str:
    """OpenSSL's hash of cert's subject (X509_NAME_hash, as `openssl x509 -hash` prints it): 8 hex digits."""
    from OpenSSL import crypto

    return "%08x" % crypto.X509.from_cryptography(cert).subject_name_hash()


def write_ca_dir(directory: str, cas=(), crls=(), policy_files: bool = False) -> str:
    """Write CAs and CRLs in the grid layout (/etc/grid-security/certificates); return directory.

    Each CA goes to <subject hash>.0, each CRL to <its CA's hash>.r0 (the CA
    that issued it must be among cas).  Files are replaced by rename, as
    fetch-crl does, so a server reading the directory never sees half a file.
    With policy_files, each CA also gets the .signing_policy and .namespaces
    files IGTF bundles ship, which hold no certificate.
    """
    os.makedirs(directory, exist_ok=True)
    hashes_by_subject = {}
    for ca in cas:
        name_hash = hashes_by_subject[ca.subject] = subject_hash(ca.cert)
        _replace(os.path.join(directory, name_hash + ".0"), ca.cert_pem)
        if policy_files:
            subject = "/" + "/".join(attribute.rfc4514_string() for attribute in ca.subject)
            _replace(
                os.path.join(directory, name_hash + ".signing_policy"),
                f"access_id_CA X509 '{subject}'\npos_rights globus CA:sign\n".encode(),
            )
            _replace(
                os.path.join(directory, name_hash + ".namespaces"),
                f'TO Issuer "{subject}" PERMIT Subject "/DC=org/DC=transferd-test/.*"\n'.encode(),
            )
    for crl in crls:
        if crl.issuer not in hashes_by_subject:
            raise ValueError(f"the CRL of {crl.issuer.rfc4514_string()} is not from one of the CAs written")
        _replace(os.path.join(directory, hashes_by_subject[crl.issuer] + ".r0"),
                 crl.public_bytes(serialization.Encoding.PEM))
    return directory


@dataclasses.dataclass
class CredentialPaths:
    """Where write_credentials put each file (None for what was not asked)."""

    ca_cert: Optional[str] = None
    ca_dir: Optional[str] = None
    user_cert: Optional[str] = None
    user_key: Optional[str] = None
    proxy: Optional[str] = None
    host_cert: Optional[str] = None
    host_key: Optional[str] = None


def _write(path, data: bytes, private=False):
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    if private:
        os.chmod(path, 0o600)  # grid tools refuse keys others can read
    return path


def _replace(path, data: bytes):
    temporary = path + ".new"
    _write(temporary, data)
    os.replace(temporary, path)


def write_credentials(
    directory: str,
    ca: Optional[Credential] = None,
    user: Optional[Credential] = None,
    proxy: Optional[Credential] = None,
    host: Optional[Credential] = None,
) -> CredentialPaths:
    """Write the given credentials under directory, in the layouts grid tools read.

    ca -> ca.pem, and certificates/<subject hash>.0 (an X509_CERT_DIR-style
    directory, hashed as OpenSSL does) when pyOpenSSL is there to compute it;
    user -> usercert.pem (certificate and chain) and userkey.pem (0600);
    proxy -> x509up (proxy certificate, key, chain; 0600);
    host -> hostcert.pem and hostkey.pem (0600).
    """
    os.makedirs(directory, exist_ok=True)
    paths = CredentialPaths()
    if ca is not None:
        paths.ca_cert = _write(os.path.join(directory, "ca.pem"), ca.cert_pem)
        paths.ca_dir = os.path.join(directory, "certificates")
        os.makedirs(paths.ca_dir, exist_ok=True)
        try:
            _write(os.path.join(paths.ca_dir, subject_hash(ca.cert) + ".0"), ca.cert_pem)
        except ImportError:  # the CA file still works; only the hashed directory is missing
            pass
    if user is not None:
        paths.user_cert = _write(os.path.join(directory, "usercert.pem"), user.cert_pem + user.chain_pem)
        paths.user_key = _write(os.path.join(directory, "userkey.pem"), user.key_pem, private=True)
    if proxy is not None:
        paths.proxy = _write(os.path.join(directory, "x509up"), proxy.proxy_file_pem, private=True)
    if host is not None:
        paths.host_cert = _write(os.path.join(directory, "hostcert.pem"), host.cert_pem + host.chain_pem)
        paths.host_key = _write(os.path.join(directory, "hostkey.pem"), host.key_pem, private=True)
    return paths


# -- VOMS -------------------------------------------------------------------------


def make_voms_server(ca: Credential, hostname: str = "voms.example.org", key_kind: str = "rsa", now=None):
    """A VOMS server's certificate (a host certificate signed by ca): its key signs attribute certificates."""
    return make_host(ca, hostname, key_kind=key_kind, now=now)


def _general_names(**names):
    sequence = rfc5280.GeneralNames()
    for kind, value in names.items():
        name = rfc5280.GeneralName()
        if kind == "directoryName":
            rdns, _ = decoder.decode(value.public_bytes(), asn1Spec=rfc5280.Name())
            name["directoryName"]["rdnSequence"] = rdns["rdnSequence"]
        else:
            name[kind] = value
        sequence.append(name)
    return sequence


def make_attribute_certificate(voms: Credential, holder: Credential, vo: str, fqans, lifetime_seconds=12 * 3600,
                               now=None, signer_key=None) -> bytes:
    """A VOMS attribute certificate (DER) for holder's certificate, issued in voms's name.

    It is signed with voms's key, or with signer_key (a forgery).  now: the
    start of its validity minus 5 minutes, as for the certificates here;
    pass a now in the past for an expired AC.
    """
    not_before, not_after = _window(now, lifetime_seconds)
    info = rfc5755.AttributeCertificateInfo()
    info["version"] = 1  # v2
    info["holder"]["baseCertificateID"]["issuer"] = _general_names(directoryName=holder.cert.issuer)
    info["holder"]["baseCertificateID"]["serial"] = holder.cert.serial_number
    info["issuer"]["v2Form"]["issuerName"] = _general_names(directoryName=voms.cert.subject)
    key = signer_key or voms.key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = "1.2.840.10045.4.3.2"
    else:
        algorithm = "1.2.840.113549.1.1.11"
    info["signature"]["algorithm"] = univ.ObjectIdentifier(algorithm)
    info["serialNumber"] = x509.random_serial_number()
    info["attrCertValidityPeriod"]["notBeforeTime"] = useful.GeneralizedTime(not_before.strftime("%Y%m%d%H%M%SZ"))
    info["attrCertValidityPeriod"]["notAfterTime"] = useful.GeneralizedTime(not_after.strftime("%Y%m%d%H%M%SZ"))
    host = voms.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    syntax = rfc5755.IetfAttrSyntax()
    authority = rfc5280.GeneralName()
    authority["uniformResourceIdentifier"] = f"{vo}://{host}:15000"
    syntax["policyAuthority"].append(authority)
    for fqan in fqans:
        value = syntax["values"].componentType.clone()
        value["octets"] = fqan.encode()
        syntax["values"].append(value)
    attribute = rfc5755.Attribute()
    attribute["type"] = vomslib.VOMS_ATTRIBUTE
    attribute["values"].append(univ.Any(encoder.encode(syntax)))
    info["attributes"].append(attribute)
    signed = encoder.encode(info)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(signed, ec.ECDSA(hashes.SHA256()))
    else:
        signature = key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    certificate = rfc5755.AttributeCertificate()
    certificate["acinfo"] = info
    certificate["signatureAlgorithm"]["algorithm"] = univ.ObjectIdentifier(algorithm)
    certificate["signatureValue"] = univ.BitString.fromOctetString(signature)
    return encoder.encode(certificate)


def make_voms_proxy(user: Credential, voms: Credential, vo: str = "meerkat", fqans=("/meerkat",),
                    ac_lifetime_seconds=12 * 3600, lifetime_seconds=12 * 3600, key_kind="rsa", now=None,
                    ac_now=None, signer_key=None, acs=None):
    """An RFC 3820 proxy of user carrying a VOMS extension, as voms-proxy-init makes it.

    The extension holds one AC from voms for fqans (ac_lifetime_seconds from
    ac_now, signed by signer_key if given), or the given acs (DER list).
    """
    if acs is None:
        acs = [make_attribute_certificate(voms, user, vo, fqans, ac_lifetime_seconds, now=ac_now or now,
                                          signer_key=signer_key)]
    outer = vomslib._ACs()
    inner = outer.componentType.clone()
    for der in acs:
        inner.append(univ.Any(der))
    outer.append(inner)
    plain = make_proxy(user, lifetime_seconds=lifetime_seconds, key_kind=key_kind, now=now)
    builder = (
        x509.CertificateBuilder()
        .subject_name(plain.cert.subject)
        .issuer_name(plain.cert.issuer)
        .public_key(plain.key.public_key())
        .serial_number(plain.cert.serial_number)
        .not_valid_before(plain.cert.not_valid_before_utc)
        .not_valid_after(plain.cert.not_valid_after_utc)
        .add_extension(x509.UnrecognizedExtension(vomslib.VOMS_EXTENSION, encoder.encode(outer)), critical=False)
    )
    for extension in plain.cert.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return Credential(builder.sign(user.key, hashes.SHA256()), plain.key, plain.chain)


def write_voms_dir(directory: str, servers) -> str:
    """Write VOMS server certificates in the vomsdir layout: {vo: [Credential]} -> directory/<vo>/<CN>.pem.

    The key None puts the certificates directly in directory (trusted for any VO).
    """
    for vo, credentials in servers.items():
        folder = os.path.join(directory, vo) if vo else directory
        os.makedirs(folder, exist_ok=True)
        for credential in credentials:
            host = credential.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            _replace(os.path.join(folder, host + ".pem"), credential.cert_pem)
    return directory
