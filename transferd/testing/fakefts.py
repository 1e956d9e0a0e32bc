"""A fake CERN FTS3 server, for tests and demos of transferd's FTS mover (or of any FTS3 client).

It speaks FTS3's REST API the way fts-rest-flask 3.13.4 (the real server,
under Apache with mod_ssl and mod_wsgi) does, over real HTTP, or HTTPS that
asks for client certificates without requiring one (``SSLVerifyClient
optional``: token users need none):

* ``GET /``: ``{"api": {"major": 3, "minor": 13, "patch": 4}, "delegation": ...}``
* ``GET /whoami``: ``user_dn``, ``dn``, ``delegation_id`` (sha1 of the DN, 16
  hex digits, as FTS computes it), ``vos``, ``vos_id``, ``base_id``,
  ``voms_cred``, ``roles``, ``level``, ``method``, ``is_root``.  The VO is
  the ``vo`` given to the fake (as VOMS attributes or a token's groups would
  give it), else, as FTS does: a certificate's delegation id, a token's
  issuer's host name.
* Anyone whose credentials are not accepted (a token not among ``tokens``, a
  JWT whose ``exp`` has passed on the fake's clock, no credential at all) is
  anonymous, as FTS makes them: ``/whoami`` answers 200 with ``method``
  "unauthenticated" and no VO, ``POST /jobs`` 403 "Not enough permissions",
  ``GET`` and ``DELETE /jobs/...`` 500 (FTS fails on the missing VO).
* ``GET /delegation/{id}`` (``null`` or ``{"termination_time", "voms_attrs":
  [""]}``), ``GET /delegation/{id}/request`` (a fresh certificate request,
  PEM, made with ``cryptography``), ``PUT /delegation/{id}/credential`` (the
  signed proxy and its chain: checked against the request's key and its
  issuer, 201), ``DELETE /delegation/{id}``
* ``POST /jobs``: ``{"job_id"}``; deterministic ids (``id_generator:
  deterministic``, ``sid``) computed as FTS does, 409 for a duplicate, 419
  when an X.509 user has delegated no credential (or one with under an hour
  left), 400 for bodies FTS would refuse (bad JSON, no files, URLs without
  scheme, host or path, ``file://``).  A token user's files start in
  TOKEN_PREP; every file's ``filesize`` is null until it ends
  (``user_filesize`` is what was submitted).
* ``GET /jobs/{id}`` (200, or 404) and ``GET /jobs/{id1},{id2}`` (200, or 207
  whose entries carry ``http_status`` "404 Not Found"), with ``?files=`` field
  lists; ``GET /jobs/{id}/files``; ``DELETE /jobs/{id}`` (200; for a job that
  had ended 200 whose body says ``"http_status": "304 Not Modified"``, or,
  with ``cancel_ended_http_304``, an HTTP 304 without body as older servers
  answer; 404)
* A request whose path, with the script path of FTS under Apache
  (SCRIPT_PATH), reaches 4,096 bytes gets Apache's HTML 404 page: 109 job
  ids in one GET fit, 110 do not.

Jobs really run.  Each file takes ``duration`` seconds (or what a rule says),
then ends FINISHED, FAILED or CANCELED; the job ends FINISHED, FAILED,
FINISHEDDIRTY (some files failed) or CANCELED.  A "LOST" rule makes the
server forget the job when it ends (GET answers 404).  With ``copy=True`` a
FINISHED file is really copied, from the local path of its source URL to the
local path of its destination URL (the path part of ``gsiftp://host/path``,
``davs://host/path``, ``file:///path``...), with FTS's checks: the source
must exist, the destination must not (unless ``overwrite``), and a checksum
given with the file must match the source's adler32.

Rules match a substring of a file's source or destination URL::

    FakeFTS(clock, fail=["bad-product=FAILED:SOURCE [2] No such file"], slow=["big-product=60"])

The server counts requests per endpoint (``requests``, e.g. ``"GET
/jobs/{ids}"``) and successful submissions per sid (``submissions``).
``GET /_fake/state`` shows both, and every job, to tests in other processes.

In-process::

    fake = FakeFTS(reactor, token="secret", copy=True)
    server = FakeFTSServer(reactor, fake)
    await server.start()              # 127.0.0.1, a free port; server.url
    test.addCleanup(server.stop)

As a process: ``twistd -n transferd-fakefts --endpoint tcp:8446:interface=127.0.0.1
--copy --token secret --duration 0.5 --fail bad=FAILED:why``.
"""

import collections
import dataclasses
import datetime
import hashlib
import json
import os
import uuid
import zlib
from typing import Optional
from urllib.parse import unquote, urlsplit

from klein import Klein
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, ssl, task, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import resource, server

from transferd.testing.servers import QuietSite, TrackingFactory

# fts-rest-flask's namespace for deterministic ids (JobBuilder_utils.BASE_ID).
FTS_BASE_ID = uuid.UUID("01874efb-4735-4595-bc9c-591aef8240c9")
API_VERSION = {"major": 3, "minor": 13, "patch": 4}
# Apache maps a request to fts-rest-flask's WSGI script; the script path and the request path together must
# stay under APACHE_PATH_LIMIT bytes, or Apache answers its own 404 page.
SCRIPT_PATH = "/usr/libexec/fts3rest/fts3rest.wsgi"
APACHE_PATH_LIMIT = 4096
APACHE_NOT_FOUND = (b'<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head>\n<title>404 Not Found</title>\n'
                    b"</head><body>\n<h1>Not Found</h1>\n<p>The requested URL was not found on this server.</p>\n"
                    b"</body></html>\n")
# The issuer of opaque (non-JWT) tokens; a token user's VO is its issuer's host name.
OPAQUE_TOKEN_ISSUER = "https://iam.example.org/"
ANONYMOUS = "unauthenticated"
INTERNAL_ERROR = ("The server encountered an internal error and was unable to complete your request. Either the "
                  "server is overloaded or there is an error in the application.")
PROXY_CERT_INFO = "1.3.6.1.5.5.7.1.14"
FAILED_JOB_REASON = "One or more files failed. Please have a look at the details for more information"
CANCELED_REASON = "Job canceled by the user"
OUTCOMES = ("FINISHED", "FAILED", "CANCELED", "LOST")
TERMINAL_FILE_STATES = ("FINISHED", "FAILED", "CANCELED")
TERMINAL_JOB_STATES = ("FINISHED", "FAILED", "FINISHEDDIRTY", "CANCELED")
# fts-rest-flask's defaults for job parameters; a parameter sent as null takes its default too.
DEFAULT_PARAMS = {
    "bring_online": -1, "verify_checksum": False, "copy_pin_lifetime": -1, "gridftp": "", "job_metadata": None,
    "overwrite": False, "reuse": None, "multihop": False, "source_spacetoken": "", "spacetoken": "",
    "retry": 0, "retry_delay": 0, "priority": 3, "max_time_in_queue": 0, "s3alternate": False,
}

def route_of(method, path):
    """The endpoint a request is counted under, e.g. "GET /jobs/{ids}"."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not parts:
        name = "/"
    elif parts[0] == "delegation" and len(parts) == 2:
        name = "/delegation/{id}"
    elif parts[0] == "delegation" and len(parts) == 3:
        name = "/delegation/{id}/" + parts[2]
    elif parts[0] == "jobs" and len(parts) == 2:
        name = "/jobs/{ids}"
    elif parts[0] == "jobs" and len(parts) == 3:
        name = "/jobs/{id}/" + parts[2]
    else:
        name = "/" + "/".join(parts)
    return f"{method} {name}"


def _now_text(seconds):
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _adler32_file(path):
    value = 1
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            value = zlib.adler32(chunk, value)
    return "%08x" % value


@dataclasses.dataclass(frozen=True)
class Rule:
    """What happens to files whose source or destination URL contains pattern."""

    pattern: str
    outcome: Optional[str] = None  # FINISHED, FAILED, CANCELED or LOST
    reason: Optional[str] = None
    duration: Optional[float] = None

    @classmethod
    def failure(cls, text):
        """ "PATTERN=OUTCOME[:REASON]" -> Rule."""
        pattern, sep, rest = text.partition("=")
        outcome, _, reason = rest.partition(":")
        outcome = outcome.strip().upper()
        if not sep or not pattern or outcome not in OUTCOMES:
            raise ValueError(f"{text!r} is not PATTERN=OUTCOME[:REASON] with OUTCOME one of {', '.join(OUTCOMES)}")
        return cls(pattern, outcome, reason.strip() or None)

    @classmethod
    def slowness(cls, text):
        """ "PATTERN=SECONDS" -> Rule."""
        pattern, sep, seconds = text.partition("=")
        try:
            duration = float(seconds)
        except ValueError:
            duration = -1
        if not sep or not pattern or duration < 0:
            raise ValueError(f"{text!r} is not PATTERN=SECONDS")
        return cls(pattern, duration=duration)


@dataclasses.dataclass
class User:
    dn: str
    method: str  # "certificate", "oauth2" or "unauthenticated"
    delegation_id: Optional[str]
    vo: Optional[str]  # None: anonymous, no VO

    @property
    def anonymous(self):
        return self.vo is None


ANONYMOUS_USER = User("anon", ANONYMOUS, None, None)


def _token_claims(token):
    """A JWT's claims, read without verifying it (the fake trusts its token list); None for opaque tokens."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


class _Refusal(Exception):
    def __init__(self, code, phrase, message):
        super().__init__(message)
        self.code, self.phrase, self.message = code, phrase, message


class _CopyFailed(Exception):
    pass


def _dn_of(certificate):
    """An OpenSSL X509's subject as FTS writes DNs: /DC=org/DC=example/CN=Someone."""
    subject = certificate.to_cryptography().subject
    return "".join(f"/{attribute.rfc4514_attribute_name}={attribute.value}" for attribute in subject)


def _identity_certificate(transport):
    """The first certificate of the verified chain that is not a proxy (RFC 3820), or None."""
    get_peer = getattr(transport, "getPeerCertificate", None)
    if get_peer is None:
        return None
    try:
        chain = transport.getHandle().get_verified_chain() or []
    except Exception:
        chain = []
    for certificate in chain:
        crypto_cert = certificate.to_cryptography() if hasattr(certificate, "to_cryptography") else None
        if crypto_cert is not None:
            oids = {ext.oid.dotted_string for ext in crypto_cert.extensions}
            if PROXY_CERT_INFO not in oids:
                return certificate
    return get_peer()


class FakeFTS:
    """The fake FTS3 REST server's state and handlers (serve resource() over HTTP or HTTPS).

    Bearer tokens among tokens are accepted, and so are client certificates
    (over HTTPS with client CAs); anyone else is anonymous, as FTS makes them
    (see the module docstring).  auth "none" (the default without tokens)
    lets anonymous callers submit too, in the VO "anonymous"; "token" and
    "x509" do not.
    vo: the VO of every authenticated user (as their VOMS attributes or
    token groups would say); None: FTS's own rule (a certificate's
    delegation id, a token's issuer's host name).  It seeds deterministic ids.
    duration: seconds each file takes unless a slow rule says otherwise.
    fail / slow: rules (Rule objects or their text forms, see Rule).
    copy: really copy FINISHED files (local paths of the URLs).
    allow_local: accept file:// URLs and plain paths (real FTS refuses them).
    submit_delay: seconds to hold the answer to a successful POST /jobs (the
    job exists at once): lets tests kill a client while its submission is pending.
    cancel_ended_http_304: cancelling an ended job answers HTTP 304 without a
    body (older servers), not 200 with "http_status": "304 Not Modified".
    """

    app = Klein()

    def __init__(self, clock, auth=None, tokens=(), token=None, vo=None, duration=0.0, fail=(), slow=(),
                 copy=False, allow_local=False, submit_delay=0.0, cancel_ended_http_304=False):
        self.clock = clock
        self.tokens = set(tokens) | ({token} if token else set())
        self.auth = auth or ("token" if self.tokens else "none")
        self.vo = vo
        self.duration = duration
        self.cancel_ended_http_304 = cancel_ended_http_304
        self.rules = [r if isinstance(r, Rule) else Rule.failure(r) for r in fail]
        self.rules += [r if isinstance(r, Rule) else Rule.slowness(r) for r in slow]
        self.copy = copy
        self.allow_local = allow_local
        self.submit_delay = submit_delay
        self.jobs = {}  # job_id -> job dict (public fields; private ones start with "_")
        self.lost = set()  # ids of jobs the server forgot (LOST rule)
        self.requests = collections.Counter()  # "METHOD /endpoint" -> count
        self.submissions = collections.Counter()  # sid -> jobs created for it
        self.credentials = {}  # delegation id -> {"dn", "termination_time" (epoch), "proxy"}
        self.credential_requests = {}  # delegation id -> private key of the request handed out
        self._forced = collections.deque()  # (status, body) or None (hang) for the next requests
        self.down = None  # an HTTP status to answer to every request, e.g. 503
        self._timers = set()
        self._copies = set()
        self._next_file_id = 1

    # -- test controls ----------------------------------------------------

    def resource(self):
        return _Gate(self, self.app.resource())

    def respond_next(self, status, count=1, body=b""):
        """Answer status to the next count requests, whatever they ask (they are still counted)."""
        self._forced.extend([(status, body)] * count)

    def hang_next(self, count=1):
        """Never answer the next count requests."""
        self._forced.extend([None] * count)

    def count(self, method, endpoint):
        """Requests seen, e.g. count("GET", "/jobs/{ids}")."""
        return self.requests[f"{method} {endpoint}"]

    def jobs_for_sid(self, sid):
        return [job for job in self.jobs.values() if job["_sid"] == str(sid)]

    def expire_credentials(self, left=60.0):
        """Make every delegated credential expire in left seconds (FTS then answers 419)."""
        for credential in self.credentials.values():
            credential["termination_time"] = self.clock.seconds() + left

    def state(self):
        """Every job, request counts and submissions, as /_fake/state shows them."""
        return {
            "jobs": [self._public(job, files=("file_state", "reason", "source_surl", "dest_surl"), sid=True)
                     for job in self.jobs.values()],
            "lost": sorted(self.lost),
            "requests": dict(self.requests),
            "submissions": dict(self.submissions),
        }

    def stop(self):
        """Cancel pending timers; fire when running copies have finished."""
        for timer in list(self._timers):
            if timer.active():
                timer.cancel()
        self._timers.clear()
        return defer.gatherResults(list(self._copies), consumeErrors=True).addBoth(lambda _: None)

    # -- helpers ----------------------------------------------------------

    def _later(self, delay, function, *args):
        timer = None

        def run():
            self._timers.discard(timer)
            function(*args)

        timer = self.clock.callLater(delay, run)
        self._timers.add(timer)
        return timer

    @staticmethod
    def _json(request, data, code=200):
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(data).encode("utf-8")

    @classmethod
    def _error(cls, request, refusal):
        return cls._json(request, {"status": f"{refusal.code} {refusal.phrase}", "message": refusal.message},
                         refusal.code)

    def _user(self, request):
        """Who is asking: a bearer token FTS accepts, else a client certificate, else anonymous."""
        authorization = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token in self.tokens:
            claims = _token_claims(token) or {}
            expiry = claims.get("exp")
            if not isinstance(expiry, (int, float)) or expiry > self.clock.seconds():
                issuer = str(claims.get("iss") or OPAQUE_TOKEN_ISSUER)
                subject = str(claims.get("sub") or "token-" + hashlib.sha1(token.encode()).hexdigest()[:12])  # nosec
                delegation_id = hashlib.sha1((issuer + subject).encode("utf-8")).hexdigest()[:16]  # nosec - an id
                return User(subject, "oauth2", delegation_id, self.vo or urlsplit(issuer).hostname or issuer)
        certificate = _identity_certificate(request.transport)
        if certificate is not None:
            dn = _dn_of(certificate)
            delegation_id = hashlib.sha1(dn.encode("utf-8")).hexdigest()[:16]  # nosec - FTS's own formula
            return User(dn, "certificate", delegation_id, self.vo or delegation_id)
        if self.auth == "none":
            return User("anon", ANONYMOUS, None, self.vo or "anonymous")
        return ANONYMOUS_USER

    def _certificate_user(self, request, delegation_id):
        user = self._user(request)
        if delegation_id != user.delegation_id:
            raise _Refusal(403, "Forbidden", "The requested ID and the credentials ID do not match")
        if user.method != "certificate":
            raise _Refusal(403, "Forbidden", "Certificate required")
        return user

    def _known_user(self, request):
        """The user of a jobs request; FTS fails (500) on an anonymous one, who has no VO."""
        user = self._user(request)
        if user.anonymous:
            raise _Refusal(500, "Internal Server Error", INTERNAL_ERROR)
        return user

    def _rule(self, urls):
        outcome, reason, duration = "FINISHED", None, self.duration
        for rule in self.rules:
            if any(rule.pattern in url for url in urls):
                if rule.outcome is not None:
                    outcome, reason = rule.outcome, rule.reason
                if rule.duration is not None:
                    duration = rule.duration
        return outcome, reason, duration

    def _public(self, job, files=None, sid=False):
        """A job as FTS shows it; files: None (none), True (all fields) or a list of field names."""
        view = {k: v for k, v in job.items() if not k.startswith("_")}
        if sid:
            view["sid"] = job["_sid"]
        if files:
            view["files"] = [
                {k: v for k, v in f.items() if not k.startswith("_") and (files is True or k in files)}
                for f in job["_files"]
            ]
        return view

    # -- API version, identity ------------------------------------------

    @app.route("/", methods=["GET"])
    def api_version(self, request):
        return self._json(request, {
            "api": API_VERSION, "delegation": {"major": 1, "minor": 0, "patch": 0},
            "core": None, "schema": None,
            "_links": {"fts:whoami": {"href": "/whoami"}, "fts:job": {"href": "/jobs/{id}", "templated": True}},
        })

    @app.route("/whoami", methods=["GET"])
    def whoami(self, request):
        user = self._user(request)
        vos = [] if user.anonymous else [user.vo]
        return self._json(request, {
            "user_dn": user.dn, "dn": [user.dn], "delegation_id": user.delegation_id,
            "vos": vos, "vos_id": [str(uuid.uuid5(FTS_BASE_ID, vo)) for vo in vos], "voms_cred": [],
            "roles": [], "level": [] if user.anonymous else {"transfer": "vo"}, "method": user.method,
            "is_root": False, "base_id": str(FTS_BASE_ID),
        })

    # -- delegation -------------------------------------------------------

    @app.route("/delegation/<delegation_id>", methods=["GET"])
    def delegation_view(self, request, delegation_id):
        try:
            self._certificate_user(request, delegation_id)
        except _Refusal as refusal:
            return self._error(request, refusal)
        credential = self.credentials.get(delegation_id)
        if credential is None:
            return self._json(request, None)
        return self._json(request, {"termination_time": _now_text(credential["termination_time"]),
                                    "voms_attrs": [""]})

    @app.route("/delegation/<delegation_id>", methods=["DELETE"])
    def delegation_delete(self, request, delegation_id):
        try:
            self._certificate_user(request, delegation_id)
        except _Refusal as refusal:
            return self._error(request, refusal)
        if self.credentials.pop(delegation_id, None) is None:
            return self._error(request, _Refusal(404, "Not Found", "Delegated credentials not found"))
        request.setResponseCode(204)
        return b""

    @app.route("/delegation/<delegation_id>/request", methods=["GET"])
    def delegation_request(self, request, delegation_id):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        try:
            self._certificate_user(request, delegation_id)
        except _Refusal as refusal:
            return self._error(request, refusal)
        key = self.credential_requests.get(delegation_id)
        if key is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.credential_requests[delegation_id] = key
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Dummy")]))
               .sign(key, hashes.SHA256()))
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"X-Delegation-ID", delegation_id.encode("ascii", "replace"))
        return csr.public_bytes(serialization.Encoding.PEM)

    @app.route("/delegation/<delegation_id>/credential", methods=["PUT", "POST"])
    def delegation_credential(self, request, delegation_id):
        try:
            user = self._certificate_user(request, delegation_id)
            key = self.credential_requests.get(delegation_id)
            if key is None:
                raise _Refusal(400, "Bad Request", "No credential cache found")
            body = request.content.read()
            expiry = self._check_proxy(body, key)
        except _Refusal as refusal:
            return self._error(request, refusal)
        self.credentials[delegation_id] = {"dn": user.dn, "termination_time": expiry, "proxy": body}
        request.setResponseCode(201)
        return b""

    @staticmethod
    def _check_proxy(body, key):
        """The proxy's expiry (epoch seconds), once it is shown to be a proxy of the request's key."""
        from cryptography import x509

        def bad(why):
            return _Refusal(400, "Bad Request", "Could not process the proxy: " + why)

        try:
            certificates = x509.load_pem_x509_certificates(body)
        except ValueError:
            raise bad("Malformed proxy") from None
        if len(certificates) < 2:
            raise bad("Malformed proxy")
        proxy, issuer = certificates[0], certificates[1]
        if proxy.public_key().public_numbers() != key.public_key().public_numbers():
            raise bad("The proxy does not match the stored associated private key")
        try:
            proxy.verify_directly_issued_by(issuer)
        except Exception:
            raise bad("Failed to verify the proxy, maybe signed with the wrong private key?") from None
        subject, issuer_name = list(proxy.subject.rdns), list(issuer.subject.rdns)
        if subject[:-1] != issuer_name:
            raise bad(f"The subject and the issuer of the proxy do not match: "
                      f"{proxy.subject.rfc4514_string()} != {issuer.subject.rfc4514_string()}")
        if subject[-1].get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME) == []:
            raise bad("Missing trailing Common Name in the proxy")
        return proxy.not_valid_after_utc.timestamp()

    # -- jobs -------------------------------------------------------------

    @app.route("/jobs", methods=["POST"])
    async def submit(self, request):
        try:
            user = self._user(request)
            if user.anonymous:
                raise _Refusal(403, "Forbidden", "Not enough permissions")
            if user.method == "certificate":
                self._check_delegation(user)
            job = self._build_job(user, request.content.read())
        except _Refusal as refusal:
            return self._error(request, refusal)
        self.jobs[job["job_id"]] = job
        self.lost.discard(job["job_id"])
        self.submissions[job["_sid"]] += 1
        self._later(0, self._activate, job["job_id"])
        for index, entry in enumerate(job["_files"]):
            self._later(entry["_duration"], self._finish_file, job["job_id"], index)
        if self.submit_delay:
            await task.deferLater(self.clock, self.submit_delay, lambda: None)
        return self._json(request, {"job_id": job["job_id"]})

    def _check_delegation(self, user):
        credential = self.credentials.get(user.delegation_id)
        if credential is None:
            raise _Refusal(419, "Authentication Timeout", f'No delegation found for "{user.dn}"')
        left = credential["termination_time"] - self.clock.seconds()
        if left <= 0:
            raise _Refusal(419, "Authentication Timeout",
                           f"The delegated credentials expired {-left:.0f} seconds ago ({user.delegation_id})")
        if left < 3600:
            raise _Refusal(419, "Authentication Timeout",
                           f"The delegated credentials has less than one hour left ({user.delegation_id})")

    def _check_url(self, url):
        if not isinstance(url, str) or not url.strip():
            raise _Refusal(400, "Bad Request", f"Invalid value within the request: bad URL {url!r}")
        parts = urlsplit(url.strip())
        local = parts.scheme in ("", "file")
        if local and self.allow_local:
            if not parts.path.startswith("/"):
                raise _Refusal(400, "Bad Request", f"Invalid value within the request: Missing path ({url})")
            return
        if not parts.scheme:
            raise _Refusal(400, "Bad Request", f"Invalid value within the request: Missing scheme ({url})")
        if parts.scheme == "file":
            raise _Refusal(400, "Bad Request",
                           f"Invalid value within the request: Can not transfer local files ({url})")
        if not parts.path or (parts.path == "/" and not parts.query):
            raise _Refusal(400, "Bad Request", f"Invalid value within the request: Missing path ({url})")
        if not parts.hostname:
            raise _Refusal(400, "Bad Request", f"Invalid value within the request: Missing host ({url})")

    def _build_job(self, user, body):
        def bad(message):
            return _Refusal(400, "Bad Request", message)

        try:
            submitted = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise bad("Badly formatted JSON request") from None
        if not isinstance(submitted, dict):
            raise bad("Badly formatted JSON request: expected an object")
        submitted_params = submitted.get("params") or {}
        if not isinstance(submitted_params, dict):
            raise bad("Malformed request: params must be an object")
        params = dict(DEFAULT_PARAMS, **submitted_params)
        for key, value in params.items():
            if value is None and key in DEFAULT_PARAMS:
                params[key] = DEFAULT_PARAMS[key]
        if submitted.get("delete") is not None:
            raise _Refusal(405, "Method Not Allowed", "Deletion jobs are no longer supported by FTS")
        files = submitted.get("files")
        if files is None:
            raise bad("No transfers operations specified")
        if not isinstance(files, list) or not files:
            raise bad("No valid pairs available")
        if (params.get("id_generator") or "standard") == "deterministic":
            sid = params.get("sid")
            if sid is None:
                raise bad("Need sid for deterministic job id generation")
            job_id = str(uuid.uuid5(uuid.uuid5(FTS_BASE_ID, user.vo), str(sid)))
        else:
            sid = None
            job_id = str(uuid.uuid1())
        if job_id in self.jobs:
            raise _Refusal(409, "Conflict", "The sid provided by the user is duplicated")
        try:
            priority = max(min(int(params.get("priority", 3)), 5), 1)
            retry = int(params.get("retry", 0))
        except (TypeError, ValueError) as error:
            raise bad(f"Invalid value within the request: {error}") from None
        verify = params.get("verify_checksum", False)
        overwrite = params.get("overwrite", False)
        overwrite = overwrite if isinstance(overwrite, bool) else str(overwrite)[:1].upper() == "Y"
        metadata = params.get("job_metadata")
        now = self.clock.seconds()
        entries = []
        for index, entry in enumerate(files):
            if not isinstance(entry, dict):
                raise bad("Malformed request: each file must be an object")
            for key in ("sources", "destinations"):
                if key not in entry:
                    raise bad(f"Missing parameter: '{key}'")
                if not isinstance(entry[key], list) or not entry[key]:
                    raise bad(f"Malformed request: {key} must be a non-empty list")
            for url in entry["sources"] + entry["destinations"]:
                self._check_url(url)
            try:
                filesize = int(entry.get("filesize") or 0)
            except (TypeError, ValueError):
                raise bad("Invalid value within the request: filesize") from None
            source, destination = entry["sources"][0].strip(), entry["destinations"][0].strip()
            outcome, reason, duration = self._rule([source, destination])
            entries.append({
                "file_id": self._next_file_id, "file_index": index, "job_id": job_id,
                "file_state": "TOKEN_PREP" if user.method == "oauth2" else "SUBMITTED",
                "source_surl": source, "dest_surl": destination,
                "source_se": self._se(source), "dest_se": self._se(destination),
                "reason": "", "filesize": None, "user_filesize": filesize,
                "checksum": entry.get("checksum") or "ADLER32", "file_metadata": entry.get("metadata"),
                "start_time": None, "finish_time": None, "tx_duration": None, "throughput": None,
                "vo_name": user.vo, "priority": priority, "activity": entry.get("activity") or "default",
                "_outcome": outcome, "_reason": reason, "_duration": duration,
            })
            self._next_file_id += 1
        ses = lambda key: entries[0][key] if all(e[key] == entries[0][key] for e in entries) else None  # noqa: E731
        verify_text = ("both" if verify else "none") if isinstance(verify, bool) else str(verify or "n")
        return {
            "job_id": job_id, "job_state": "SUBMITTED", "job_type": "N",
            "source_se": ses("source_se"), "dest_se": ses("dest_se"),
            "user_dn": user.dn, "cred_id": user.delegation_id, "vo_name": user.vo,
            "reason": None, "submit_time": _now_text(now), "job_finished": None,
            "priority": priority, "verify_checksum": verify_text[:1], "overwrite_flag": overwrite,
            "retry": retry, "job_metadata": dict(metadata, auth_method=user.method) if isinstance(metadata, dict)
            else {"auth_method": user.method},
            "_sid": str(sid) if sid is not None else None, "_files": entries,
        }

    @staticmethod
    def _se(url):
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname or ''}"

    def _activate(self, job_id):
        job = self.jobs.get(job_id)
        if job is None or job["job_state"] != "SUBMITTED":
            return
        job["job_state"] = "ACTIVE"
        now = _now_text(self.clock.seconds())
        for entry in job["_files"]:
            if entry["file_state"] in ("TOKEN_PREP", "SUBMITTED"):
                entry["file_state"], entry["start_time"] = "ACTIVE", now

    def _finish_file(self, job_id, index):
        job = self.jobs.get(job_id)
        if job is None:
            return
        entry = job["_files"][index]
        if entry["file_state"] in TERMINAL_FILE_STATES:
            return
        self._activate(job_id)
        outcome = entry["_outcome"]
        if outcome == "LOST":
            del self.jobs[job_id]
            self.lost.add(job_id)
            return
        if outcome == "FINISHED" and self.copy:
            copying = threads.deferToThread(self._copy, entry, job["overwrite_flag"], job["verify_checksum"] != "n")
            self._copies.add(copying)
            copying.addBoth(self._copied, job, entry, copying)
            return
        self._end_file(job, entry, outcome, entry["_reason"])

    def _copied(self, result, job, entry, copying):
        self._copies.discard(copying)
        if isinstance(result, Failure):
            error = result.value
            reason = str(error) if isinstance(error, _CopyFailed) else f"TRANSFER ERROR: {error}"
            self._end_file(job, entry, "FAILED", reason)
        else:
            entry["filesize"] = result
            self._end_file(job, entry, "FINISHED", None)

    def local_path(self, url):
        """The local file a URL stands for when copying: the path part, whatever the scheme and host."""
        return unquote(urlsplit(url).path)

    def _copy(self, entry, overwrite, verify):
        """Copy one file (in a thread); return its size or raise _CopyFailed with an FTS-like reason."""
        source, target = self.local_path(entry["source_surl"]), self.local_path(entry["dest_surl"])
        if not os.path.isfile(source):
            raise _CopyFailed(f"SOURCE [2] Failed to stat file ({entry['source_surl']}): No such file or directory")
        if os.path.exists(target) and not overwrite:
            raise _CopyFailed("DESTINATION OVERWRITE [17] Destination file exists and overwrite is not enabled")
        wanted = str(entry.get("checksum") or "")
        if verify and ":" in wanted:
            kind, _, value = wanted.partition(":")
            if kind.lower() == "adler32" and value.lower().zfill(8) != _adler32_file(source):
                raise _CopyFailed(f"SOURCE CHECKSUM MISMATCH User defined checksum and source checksum do not "
                                  f"match {value.lower()} != {_adler32_file(source)}")
        os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
        partial = target + ".fakefts-part"
        size = 0
        with open(source, "rb") as reader, open(partial, "wb") as writer:
            while chunk := reader.read(1 << 20):
                writer.write(chunk)
                size += len(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(partial, target)
        return size

    def _end_file(self, job, entry, state, reason):
        now = self.clock.seconds()
        entry["file_state"] = state
        if entry["filesize"] is None:  # the size copied (copy=True), else what the submission said
            entry["filesize"] = entry["user_filesize"] if state == "FINISHED" else 0
        entry["finish_time"] = _now_text(now)
        if state == "FAILED":
            entry["reason"] = reason or "TRANSFER ERROR: simulated failure"
        elif state == "CANCELED":
            entry["reason"] = reason or CANCELED_REASON
        entry["tx_duration"] = entry["_duration"]
        states = [f["file_state"] for f in job["_files"]]
        if any(s not in TERMINAL_FILE_STATES for s in states):
            return
        if all(s == "FINISHED" for s in states):
            job["job_state"], job["reason"] = "FINISHED", None
        elif "CANCELED" in states:
            job["job_state"], job["reason"] = "CANCELED", reason or CANCELED_REASON
        elif "FINISHED" in states:
            job["job_state"], job["reason"] = "FINISHEDDIRTY", FAILED_JOB_REASON
        else:
            job["job_state"], job["reason"] = "FAILED", FAILED_JOB_REASON
        job["job_finished"] = _now_text(now)

    def _lookup(self, job_id, user):
        job = self.jobs.get(job_id)
        if job is None:
            return {"job_id": job_id, "http_status": "404 Not Found",
                    "http_message": f'No job with the id "{job_id}" has been found'}
        return job

    @app.route("/jobs/<job_list>", methods=["GET"])
    def get_jobs(self, request, job_list):
        try:
            user = self._known_user(request)
        except _Refusal as refusal:
            return self._error(request, refusal)
        requested = job_list.split(",")
        fields = request.args.get(b"files", [b""])[0].decode("utf-8", "replace")
        fields = [f for f in fields.split(",") if f]
        answers = []
        for job_id in filter(len, requested):
            found = self._lookup(job_id, user)
            if "http_status" in found:
                answers.append(found)
            else:
                answers.append(dict(self._public(found, files=fields or None), http_status="200 Ok"))
        if len(requested) == 1:
            single = answers[0] if answers else {"job_id": "", "http_status": "404 Not Found",
                                                 "http_message": "No job id given"}
            return self._json(request, single, int(single["http_status"][:3]))
        errors = any(not a["http_status"].startswith("2") for a in answers)
        return self._json(request, answers, 207 if errors else 200)

    @app.route("/jobs/<job_id>/files", methods=["GET"])
    def get_files(self, request, job_id):
        try:
            user = self._known_user(request)
        except _Refusal as refusal:
            return self._error(request, refusal)
        found = self._lookup(job_id, user)
        if "http_status" in found:
            return self._error(request, _Refusal(404, "Not Found", found["http_message"]))
        return self._json(request, self._public(found, files=True)["files"])

    @app.route("/jobs/<job_id>/dm", methods=["GET"])
    def get_dm(self, request, job_id):
        """Data management operations of a job: none, transfers are all this fake runs."""
        try:
            user = self._known_user(request)
        except _Refusal as refusal:
            return self._error(request, refusal)
        found = self._lookup(job_id, user)
        if "http_status" in found:
            return self._error(request, _Refusal(404, "Not Found", found["http_message"]))
        return self._json(request, [])

    @app.route("/jobs/<job_list>", methods=["DELETE"])
    def cancel_jobs(self, request, job_list):
        try:
            user = self._known_user(request)
        except _Refusal as refusal:
            return self._error(request, refusal)
        requested = job_list.split(",")
        answers = []
        now = self.clock.seconds()
        for job_id in filter(len, requested):
            found = self._lookup(job_id, user)
            if "http_status" in found:
                answers.append(found)
                continue
            if found["job_state"] in TERMINAL_JOB_STATES:
                answers.append(dict(self._public(found), http_status="304 Not Modified",
                                    http_message="The job is in a terminal state"))
                continue
            found["job_state"], found["reason"], found["job_finished"] = "CANCELED", CANCELED_REASON, _now_text(now)
            for entry in found["_files"]:
                if entry["file_state"] not in TERMINAL_FILE_STATES:
                    entry["file_state"], entry["reason"], entry["finish_time"] = \
                        "CANCELED", CANCELED_REASON, _now_text(now)
            answers.append(dict(self._public(found), http_status="200 Ok", http_message=None))
        if len(requested) == 1 and answers:
            (single,) = answers
            if single["http_status"].startswith("304") and self.cancel_ended_http_304:
                request.setResponseCode(304)
                return b""
            ended = single["http_status"].startswith(("200", "304"))  # FTS says 304 in a 200's body
            return self._json(request, single, 200 if ended else int(single["http_status"][:3]))
        errors = any(not a["http_status"].startswith(("2", "304")) for a in answers)
        return self._json(request, answers, 207 if errors else 200)

    # -- for tests in other processes ------------------------------------

    @app.route("/_fake/state", methods=["GET"])
    def fake_state(self, request):
        return self._json(request, self.state())


class _Gate(resource.Resource):
    """In front of the Klein app, as Apache is: refuses over-long paths, counts requests, answers forced statuses."""

    isLeaf = True

    def __init__(self, fake, inner):
        super().__init__()
        self.fake = fake
        self.inner = inner

    def render(self, request):
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        if len(SCRIPT_PATH.encode()) + len(request.path) >= APACHE_PATH_LIMIT:
            self.fake.requests["too long"] += 1
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/html; charset=iso-8859-1")
            return APACHE_NOT_FOUND
        if not path.startswith("/_fake/"):
            self.fake.requests[route_of(method, path)] += 1
            if self.fake.down is not None:
                request.setResponseCode(self.fake.down)
                return json.dumps({"status": f"{self.fake.down}", "message": "FTS is down (fake)"}).encode()
            if self.fake._forced:
                forced = self.fake._forced.popleft()
                if forced is None:
                    return server.NOT_DONE_YET
                status, body = forced
                request.setResponseCode(status)
                return body
        return self.inner.render(request)


class ProxyAwareOptions(ssl.CertificateOptions):
    """Server TLS options that accept RFC 3820 proxy certificates from clients."""

    def getContext(self):
        from OpenSSL import crypto

        context = super().getContext()
        context.get_cert_store().set_flags(crypto.X509StoreFlags.ALLOW_PROXY_CERTS)
        return context


def server_tls_options(cert_path, key_path, client_ca_path=None):
    """TLS options for the fake: our certificate; with client_ca_path, client certificates from those CAs are
    asked for and verified, but not required (Apache's SSLVerifyClient optional, as FTS runs it)."""
    from OpenSSL import crypto

    with open(cert_path, "rb") as handle:
        certificate = crypto.load_certificate(crypto.FILETYPE_PEM, handle.read())
    with open(key_path, "rb") as handle:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, handle.read())
    # ALPN offered by clients (requests, curl) needs a protocol list on our side; never h2 (no request.transport).
    protocols = [b"http/1.1"]
    if not client_ca_path:
        return ssl.CertificateOptions(privateKey=key, certificate=certificate, acceptableProtocols=protocols)
    from transferd.tls import pem_blocks

    with open(client_ca_path, "rb") as handle:
        blocks = pem_blocks(handle.read(), (b"CERTIFICATE",))
    cas = [crypto.load_certificate(crypto.FILETYPE_PEM, pem) for pem in blocks]
    return ProxyAwareOptions(privateKey=key, certificate=certificate, verify=True, caCerts=cas,
                             requireCertificate=False, acceptableProtocols=protocols)


class FakeFTSServer:
    """A FakeFTS listening on 127.0.0.1 (port 0: a free one), over HTTP or, with tls_options, HTTPS.

    Without fake, a FakeFTS is made from fake_options, timed by clock (default: reactor).
    """

    def __init__(self, reactor, fake=None, tls_options=None, port=0, clock=None, **fake_options):
        self.reactor = reactor
        self.fake = fake if fake is not None else FakeFTS(clock if clock is not None else reactor, **fake_options)
        self.site = QuietSite(self.fake.resource())
        self.tls_options = tls_options
        self._connections = TrackingFactory(self.site)
        self.port_number = port
        self.port = None
        self.url = None

    async def start(self):
        """Listen; fire with the base URL."""
        factory = self._connections
        if self.tls_options is not None:
            factory = TLSMemoryBIOFactory(self.tls_options, False, factory)
        self.port = await TCP4ServerEndpoint(self.reactor, self.port_number, interface="127.0.0.1").listen(factory)
        self.port_number = self.port.getHost().port
        self.url = f"{'https' if self.tls_options is not None else 'http'}://127.0.0.1:{self.port_number}"
        return self.url

    def stop_listening(self):
        """Go away as a crashed server does: stop listening and drop every open connection.

        Clients then see "connection refused"; start() listens again on the same port.
        """
        port, self.port = self.port, None
        return self._connections.close_all(port)

    def stop(self):
        """Stop listening, close every connection and stop the fake's timers; fires when all is done."""
        return defer.gatherResults([self.stop_listening(), self.fake.stop()],
                                   consumeErrors=True).addCallback(lambda _: None)


# -- test PKI ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TestPKI:
    """A throw-away CA, a server certificate for 127.0.0.1 and a user certificate, as PEM files."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    ca: str
    server_cert: str
    server_key: str
    user_cert: str
    user_key: str
    user_dn: str

    @classmethod
    def create(cls, directory, user_cn="Test User", user_lifetime=7 * 86400):
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        os.makedirs(directory, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)

        def name(*pairs):
            return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])

        def issue(subject, key, issuer, issuer_key, lifetime, ca=False, extensions=()):
            builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                       .public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(minutes=5))
                       .not_valid_after(now + datetime.timedelta(seconds=lifetime))
                       .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            for extension in extensions:
                builder = builder.add_extension(extension, critical=False)
            return builder.sign(issuer_key, hashes.SHA256())

        def write(filename, *blobs):
            path = os.path.join(directory, filename)
            with open(path, "wb") as handle:
                handle.write(b"".join(blobs))
            os.chmod(path, 0o600)
            return path

        def key_pem(key):
            return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())

        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_name = name((NameOID.DOMAIN_COMPONENT, "org"), (NameOID.DOMAIN_COMPONENT, "example"),
                       (NameOID.COMMON_NAME, "Fake FTS Test CA"))
        ca_cert = issue(ca_name, ca_key, ca_name, ca_key, 30 * 86400, ca=True)
        server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        server_cert = issue(name((NameOID.COMMON_NAME, "127.0.0.1")), server_key, ca_name, ca_key, 30 * 86400,
                            extensions=[x509.SubjectAlternativeName([
                                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])])
        user_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        user_name = name((NameOID.DOMAIN_COMPONENT, "org"), (NameOID.DOMAIN_COMPONENT, "example"),
                         (NameOID.ORGANIZATION_NAME, "Test"), (NameOID.COMMON_NAME, user_cn))
        user_cert = issue(user_name, user_key, ca_name, ca_key, user_lifetime)
        pem = serialization.Encoding.PEM
        return cls(
            ca=write("ca.pem", ca_cert.public_bytes(pem)),
            server_cert=write("server.pem", server_cert.public_bytes(pem)),
            server_key=write("server.key", key_pem(server_key)),
            user_cert=write("user.pem", user_cert.public_bytes(pem)),
            user_key=write("user.key", key_pem(user_key)),
            user_dn=f"/DC=org/DC=example/O=Test/CN={user_cn}",
        )

    def server_options(self):
        """TLS options for a FakeFTSServer asking for (not requiring) client certificates from this CA."""
        return server_tls_options(self.server_cert, self.server_key, self.ca)


# -- twistd plugin: twistd -n transferd-fakefts -------------------------------


class Options(usage.Options):
    synopsis = "[--endpoint SPEC] [--copy] [--duration S] [--fail PATTERN=OUTCOME[:REASON]] [--token T] ..."
    longdesc = ("Run a fake CERN FTS3 REST server (see transferd.testing.fakefts), for tests and demos. "
                "It is not FTS: it keeps jobs in memory and copies files only between local paths.")
    optParameters = [
        ["endpoint", "e", "tcp:8446:interface=127.0.0.1", "listen on this Twisted endpoint"],
        ["duration", "d", "0.5", "seconds each file takes"],
        ["vo", None, None, "the VO of every authenticated user (default: as FTS derives it; it seeds job ids)"],
        ["submit-delay", None, "0", "seconds to hold each successful POST /jobs answer (the job exists at once)"],
        ["tls-cert", None, None, "serve HTTPS with this certificate (PEM)"],
        ["tls-key", None, None, "... and this key (PEM)"],
        ["client-ca", None, None, "accept client certificates (X.509 auth) issued by these CAs (PEM)"],
    ]
    optFlags = [
        ["copy", None, "really copy FINISHED files between the local paths of their URLs"],
        ["allow-local", None, "accept file:// URLs and plain paths (real FTS refuses them)"],
        ["cancel-ended-http-304", None, "cancelling an ended job answers HTTP 304 without a body (older servers)"],
    ]

    def __init__(self):
        super().__init__()
        self["tokens"] = []
        self["fail"] = []
        self["slow"] = []

    def opt_token(self, token):
        """accept this bearer token (repeatable); with no token and no --client-ca, anyone may submit"""
        self["tokens"].append(token)

    def opt_fail(self, rule):
        """PATTERN=OUTCOME[:REASON]: files whose URLs contain PATTERN end FAILED, CANCELED or LOST (repeatable)"""
        try:
            self["fail"].append(Rule.failure(rule))
        except ValueError as error:
            raise usage.UsageError(str(error)) from None

    def opt_slow(self, rule):
        """PATTERN=SECONDS: files whose URLs contain PATTERN take that long (repeatable)"""
        try:
            self["slow"].append(Rule.slowness(rule))
        except ValueError as error:
            raise usage.UsageError(str(error)) from None

    def postOptions(self):
        for key in ("duration", "submit-delay"):
            try:
                self[key] = float(self[key])
            except ValueError:
                raise usage.UsageError(f"--{key} must be a number of seconds") from None
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["client-ca"] and not self["tls-cert"]:
            raise usage.UsageError("--client-ca needs --tls-cert and --tls-key")


def makeService(options):
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    fake = FakeFTS(
        reactor, auth="x509" if options["client-ca"] else None, tokens=options["tokens"], vo=options["vo"],
        duration=options["duration"], fail=options["fail"], slow=options["slow"], copy=options["copy"],
        allow_local=options["allow-local"], submit_delay=options["submit-delay"],
        cancel_ended_http_304=options["cancel-ended-http-304"],
    )
    site = server.Site(fake.resource())
    factory = site
    if options["tls-cert"]:
        tls = server_tls_options(options["tls-cert"], options["tls-key"], options["client-ca"])
        factory = TLSMemoryBIOFactory(tls, False, site)
    service = StreamServerEndpointService(serverFromString(reactor, options["endpoint"]), factory)
    service.fake = fake
    return service
