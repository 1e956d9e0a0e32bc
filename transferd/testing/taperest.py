"""A fake WLCG Tape REST API server (v1), for tests and demos of tape staging.

It stands in for the tape front-end of dCache, CTA/EOS or StoRM: real HTTP
(or HTTPS, optionally demanding a client certificate) on 127.0.0.1, the
real endpoints, bodies and status codes, and recalls that take time.

    server = FakeTapeRestServer(reactor, clock=clock)   # clock: a task.Clock (default: the reactor)
    await server.start()                       # listens on 127.0.0.1, a free port
    test.addCleanup(server.stop)
    server.url            # "http://127.0.0.1:PORT": the site (discovery document there)
    server.endpoint_url   # "http://127.0.0.1:PORT/api/v1": the v1 endpoint

What it serves (errors are RFC 7807 ``application/problem+json`` bodies
``{"type", "title", "status", "detail"}``):

* ``GET /.well-known/wlcg-tape-rest-api``: ``{"sitename", "description",
  "endpoints": [{"uri", "version", "metadata"}]}``, offering a v0 endpoint
  (which answers nothing) before the v1 one, so clients must choose.
* ``POST /api/v1/stage`` ``{"files": [{"path", "diskLifetime"?, "targetQos"?}]}``:
  201 ``{"requestId"}`` with a ``Location`` header; 400 for a body that is
  not such an object (paths must be absolute; a path given twice in one
  request is refused too), 413 above max_files.
* ``GET /api/v1/stage/<id>``: 200 ``{"id", "createdAt", "startedAt",
  "completedAt", "files": [{"path", "state", "onDisk"?, "error"?,
  "startedAt"?, "finishedAt"?}]}`` with the files in a random order (times
  are epoch seconds); 404 for an unknown id.
* ``POST /api/v1/stage/<id>/cancel`` ``{"paths": [...]}``: 200; 400 when a
  path is not part of the request; 404 unknown id.
* ``DELETE /api/v1/stage/<id>``: 200 (pending files are cancelled and the
  request forgotten); 404.
* ``POST /api/v1/release/<id>`` ``{"paths": [...]}``: 200; 400; 404.
* ``POST /api/v1/archiveinfo`` ``{"paths": [...]}``: 200 ``[{"path",
  "locality"} | {"path", "error"}]``.

A file of a request is SUBMITTED for queue_seconds, then STARTED for its
recall time (recall_seconds, or set_recall(path, seconds)), then COMPLETED
with ``onDisk: true``, or FAILED with an error for the paths given to
fail_path(path, error); cancelled files are CANCELLED.  Time is the clock's.

For tests: ``calls`` counts requests per endpoint ("discovery", "stage",
"status", "cancel", "delete", "release", "archiveinfo"), ``requests`` lists
every request seen (method, path, endpoint, Authorization header, JSON body,
client certificate subject); ``token`` (when set) makes every API endpoint
answer 401 without ``Authorization: Bearer <token>``; respond_next() and
hang_next() force answers (a 503, no answer at all) for the next requests;
forget(request_id) makes the server lose a request; stop() then start() make
it go away and come back on the same port.  TestPKI makes a CA, a server
certificate and a client certificate for HTTPS tests.
"""

import collections
import dataclasses
import datetime
import ipaddress
import json
import os
import random
import uuid
from typing import Any, Optional
from urllib.parse import unquote

from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.web import resource, server

from transferd.testing.servers import QuietSite, TrackingFactory

WELL_KNOWN = "/.well-known/wlcg-tape-rest-api"
MAX_BODY = 1 << 20

SUBMITTED, STARTED, COMPLETED, FAILED, CANCELLED = "SUBMITTED", "STARTED", "COMPLETED", "FAILED", "CANCELLED"
FINAL = frozenset({COMPLETED, FAILED, CANCELLED})


class Problem(Exception):
    """An error answer: status code, title and detail (sent as problem+json)."""

    def __init__(self, status, title, detail=None, headers=None):
        super().__init__(title)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


@dataclasses.dataclass(frozen=True)
class Seen:
    """One request the server received."""

    method: str
    path: str
    endpoint: Optional[str]  # discovery, stage, status, cancel, delete, release, archiveinfo (None: unknown)
    authorization: Optional[str]
    body: Any  # the parsed JSON body, or None
    client: Optional[str] = None  # the TLS client certificate's subject common name


@dataclasses.dataclass
class _File:
    path: str
    submitted: float
    start: float  # when its recall starts
    finish: float  # when it ends on disk (or fails)
    error: Optional[str] = None  # it FAILS with this
    cancelled: Optional[float] = None
    released: bool = False

    def state(self, now):
        if self.cancelled is not None:
            return CANCELLED
        if now < self.start:
            return SUBMITTED
        if now < self.finish:
            return STARTED
        return FAILED if self.error else COMPLETED

    def view(self, now, omit_state_on_disk):
        state = self.state(now)
        entry = {"path": self.path}
        if state == COMPLETED:
            entry["onDisk"] = True
            if not omit_state_on_disk:
                entry["state"] = state
        else:
            entry["state"] = state
        if state in (STARTED, COMPLETED, FAILED):
            entry["startedAt"] = int(self.start)
        if state in (COMPLETED, FAILED):
            entry["finishedAt"] = int(self.finish)
        elif state == CANCELLED:
            entry["finishedAt"] = int(self.cancelled)
        if state == FAILED:
            entry["error"] = self.error
        return entry


@dataclasses.dataclass
class _Request:
    id: str
    created: float
    files: dict  # path -> _File, in submission order


class FakeTapeRest(resource.Resource):
    """The Tape REST resource; see the module docstring.  FakeTapeRestServer puts it on a port."""

    isLeaf = True

    def __init__(self, clock, api_path="/api/v1", token=None, recall_seconds=0.0, queue_seconds=0.0,
                 seed=None, max_files=10_000, omit_state_on_disk=False, local_files=False):
        """clock: time of the recalls.  token: the bearer token required (None: no check).
        recall_seconds / queue_seconds: default time STARTED / SUBMITTED.  seed: of the shuffles.
        max_files: more files in one POST /stage answer 413.  omit_state_on_disk: describe a
        recalled file by "onDisk": true only, without "state" (as some servers do).  local_files:
        a path that is not a file on this machine FAILS ("No such file or directory").
        """
        super().__init__()
        self.clock = clock
        self.api_path = "/" + api_path.strip("/")
        self.token = token
        self.recall_seconds = recall_seconds
        self.queue_seconds = queue_seconds
        self.max_files = max_files
        self.omit_state_on_disk = omit_state_on_disk
        self.local_files = local_files
        self.base_url = "http://127.0.0.1"  # set by the server once it listens
        self.calls = collections.Counter()
        self.requests = []  # of Seen
        self.stage_requests = {}  # id -> _Request
        self.cancelled = []  # (request id, path), in order
        self.released = []  # (request id, path), in order
        self.hanging = []
        self._recall = {}  # path -> seconds
        self._failures = {}  # path -> error
        self._forced = []  # [endpoint or None, status, title, detail] or [endpoint, None] to hang
        self._random = random.Random(seed)

    # -- set-up by tests ------------------------------------------------------

    def set_recall(self, path, seconds):
        """Files with this path take this many seconds STARTED (requests made from now on)."""
        self._recall[path] = seconds

    def fail_path(self, path, error="tape cartridge unreadable"):
        """Recalls of this path end FAILED with error (requests made from now on)."""
        self._failures[path] = error

    def respond_next(self, status, count=1, endpoint=None, title=None, detail=None, html=False):
        """Answer status (problem+json) to the next count requests (for endpoint only, if given).

        html: answer a web server's HTML error page instead, as a proxy in front of the API would.
        """
        for _ in range(count):
            self._forced.append([endpoint, status, title or f"forced {status}", detail or "forced by the test", html])

    def hang_next(self, count=1, endpoint=None):
        """Never answer the next count requests (for endpoint only, if given) until the server stops."""
        for _ in range(count):
            self._forced.append([endpoint, None])

    def forget(self, request_id):
        """Lose a staging request, as a tape system wiped or restarted without its database would."""
        self.stage_requests.pop(request_id, None)

    def stage_calls_for(self, path):
        """The ids of the staging requests that included path."""
        return [r.id for r in self.stage_requests.values() if path in r.files]

    def state_of(self, request_id, path):
        return self.stage_requests[request_id].files[path].state(self.clock.seconds())

    # -- HTTP -------------------------------------------------------------------

    def render(self, request):
        path = unquote(request.path.decode("utf-8", "replace"))
        method = request.method.decode("ascii", "replace")
        request.content.seek(0)
        raw = request.content.read(MAX_BODY + 1)
        try:
            endpoint, handler, args = self._route(method, path)
        except Problem as problem:
            endpoint, handler, args, routing = None, None, (), problem
        else:
            routing = None
        body = None
        if raw.strip():
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                body = None
        authorization = request.getHeader("authorization")
        self.requests.append(Seen(method, path, endpoint, authorization, body, self._client_name(request)))
        if endpoint is not None:
            self.calls[endpoint] += 1
        for index, forced in enumerate(self._forced):
            if forced[0] is None or forced[0] == endpoint:
                del self._forced[index]
                if forced[1] is None:
                    self.hanging.append(request)
                    return server.NOT_DONE_YET
                if forced[4]:
                    request.setResponseCode(forced[1])
                    request.setHeader("content-type", "text/html")
                    return f"<html><body><h1>{forced[1]} {forced[2]}</h1></body></html>".encode()
                return self._problem(request, Problem(forced[1], forced[2], forced[3]))
        try:
            if routing is not None:
                raise routing
            if endpoint != "discovery":
                self._authorize(authorization)
            if len(raw) > MAX_BODY:
                raise Problem(413, "Request body too large", f"at most {MAX_BODY} bytes")
            if method == "POST" and not isinstance(body, (dict, list)):
                raise Problem(400, "Invalid request", "the request body must be JSON")
            status, answer, headers = handler(body, *args)
        except Problem as problem:
            return self._problem(request, problem)
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        if answer is None:
            return b""
        request.setHeader("content-type", "application/json")
        return json.dumps(answer).encode("utf-8")

    @staticmethod
    def _client_name(request):
        transport = getattr(request.channel, "transport", None)
        try:
            certificate = transport.getPeerCertificate() if transport is not None else None
        except Exception:
            certificate = None
        if certificate is None:
            return None
        from cryptography.x509.oid import NameOID

        names = certificate.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    def _authorize(self, authorization):
        if self.token is None:
            return
        if not authorization:
            raise Problem(401, "Unauthorized", "a bearer token is required",
                          {"WWW-Authenticate": 'Bearer realm="tape"'})
        if authorization != f"Bearer {self.token}":
            raise Problem(401, "Unauthorized", "the bearer token is not valid",
                          {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def _route(self, method, path):
        """(endpoint name, handler, args) for a request; raise Problem 404/405 otherwise."""
        routes = []
        if path.rstrip("/") == WELL_KNOWN:
            routes = [("GET", "discovery", self._discovery, ())]
        elif path == self.api_path or path.startswith(self.api_path + "/"):
            pieces = [p for p in path[len(self.api_path):].split("/") if p]
            if pieces == ["stage"]:
                routes = [("POST", "stage", self._stage, ())]
            elif len(pieces) == 2 and pieces[0] == "stage":
                routes = [("GET", "status", self._status, (pieces[1],)),
                          ("DELETE", "delete", self._delete, (pieces[1],))]
            elif len(pieces) == 3 and pieces[0] == "stage" and pieces[2] == "cancel":
                routes = [("POST", "cancel", self._cancel, (pieces[1],))]
            elif len(pieces) == 2 and pieces[0] == "release":
                routes = [("POST", "release", self._release, (pieces[1],))]
            elif pieces == ["archiveinfo"]:
                routes = [("POST", "archiveinfo", self._archiveinfo, ())]
        if not routes:
            raise Problem(404, "Not found", f"{path} is not a Tape REST API resource")
        for allowed, endpoint, handler, args in routes:
            if allowed == method:
                return endpoint, handler, args
        raise Problem(405, "Method not allowed", f"{path} does not accept {method}",
                      {"Allow": ", ".join(route[0] for route in routes)})

    @staticmethod
    def _problem(request, problem):
        request.setResponseCode(problem.status)
        for name, value in problem.headers.items():
            request.setHeader(name, value)
        request.setHeader("content-type", "application/problem+json")
        body = {"type": "about:blank", "title": problem.title, "status": problem.status}
        if problem.detail:
            body["detail"] = problem.detail
        return json.dumps(body).encode("utf-8")

    # -- endpoints ----------------------------------------------------------------

    def _discovery(self, body):
        return 200, {
            "sitename": "fake-tape",
            "description": "transferd's fake WLCG Tape REST API (transferd.testing.taperest)",
            "endpoints": [
                {"uri": self.base_url + "/api/v0", "version": "v0", "metadata": {}},
                {"uri": self.base_url + self.api_path, "version": "v1", "metadata": {}},
            ],
        }, {}

    def _stage(self, body):
        if not isinstance(body, dict) or not isinstance(body.get("files"), list) or not body["files"]:
            raise Problem(400, "Invalid request",
                          'the body must be {"files": [{"path": ...}, ...]} with at least one file')
        if len(body["files"]) > self.max_files:
            raise Problem(413, "Too many files", f"at most {self.max_files} files per request")
        paths = []
        for entry in body["files"]:
            path = entry.get("path") if isinstance(entry, dict) else None
            if not isinstance(path, str) or not path.startswith("/"):
                raise Problem(400, "Invalid request", f"every file needs an absolute path: {entry!r}")
            for optional in ("diskLifetime", "targetQos"):
                if optional in entry and not isinstance(entry[optional], str):
                    raise Problem(400, "Invalid request", f"{optional} must be a string")
            if entry["path"] in paths:
                raise Problem(400, "Invalid request", f"{entry['path']} is given twice")
            paths.append(entry["path"])
        now = self.clock.seconds()
        request_id = str(uuid.uuid4())
        files = {}
        for path in paths:
            start = now + self.queue_seconds
            error = self._failures.get(path)
            if error is None and self.local_files and not os.path.isfile(path):
                error = "No such file or directory"
            files[path] = _File(path, now, start, start + self._recall.get(path, self.recall_seconds), error)
        self.stage_requests[request_id] = _Request(request_id, now, files)
        location = f"{self.base_url}{self.api_path}/stage/{request_id}"
        return 201, {"requestId": request_id}, {"Location": location}

    def _known(self, request_id):
        try:
            return self.stage_requests[request_id]
        except KeyError:
            raise Problem(404, "Not found", f"no staging request {request_id}") from None

    def _status(self, body, request_id):
        stage = self._known(request_id)
        now = self.clock.seconds()
        views = [f.view(now, self.omit_state_on_disk) for f in stage.files.values()]
        self._random.shuffle(views)
        started = [f.start for f in stage.files.values() if f.state(now) != SUBMITTED and f.cancelled is None]
        answer = {"id": stage.id, "createdAt": int(stage.created), "files": views}
        if started:
            answer["startedAt"] = int(min(started))
        if all(f.state(now) in FINAL for f in stage.files.values()):
            answer["completedAt"] = int(max(f.cancelled if f.cancelled is not None else f.finish
                                            for f in stage.files.values()))
        return 200, answer, {}

    def _paths(self, body, stage):
        paths = body.get("paths") if isinstance(body, dict) else None
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise Problem(400, "Invalid request", 'the body must be {"paths": [...]} with at least one path')
        missing = [p for p in paths if p not in stage.files]
        if missing:
            raise Problem(400, "File missing from stage request",
                          f"{', '.join(missing)} not part of request {stage.id}; nothing was changed")
        return paths

    def _cancel(self, body, request_id):
        stage = self._known(request_id)
        now = self.clock.seconds()
        for path in self._paths(body, stage):
            record = stage.files[path]
            if record.state(now) not in FINAL:
                record.cancelled = now
            self.cancelled.append((request_id, path))
        return 200, None, {}

    def _delete(self, body, request_id):
        stage = self._known(request_id)
        now = self.clock.seconds()
        for record in stage.files.values():
            if record.state(now) not in FINAL:
                record.cancelled = now
        del self.stage_requests[request_id]
        return 200, None, {}

    def _release(self, body, request_id):
        stage = self._known(request_id)
        for path in self._paths(body, stage):
            stage.files[path].released = True
            self.released.append((request_id, path))
        return 200, None, {}

    def _archiveinfo(self, body):
        paths = body.get("paths") if isinstance(body, dict) else None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise Problem(400, "Invalid request", 'the body must be {"paths": [...]}')
        now = self.clock.seconds()
        answer = []
        for path in paths:
            if self.local_files and not os.path.isfile(path):
                answer.append({"path": path, "error": "No such file or directory"})
                continue
            on_disk = any(r.files[path].state(now) == COMPLETED and not r.files[path].released
                          for r in self.stage_requests.values() if path in r.files)
            answer.append({"path": path, "locality": "DISK_AND_TAPE" if on_disk else "TAPE"})
        return 200, answer, {}


class FakeTapeRestServer:
    """FakeTapeRest on 127.0.0.1 (a free port), over HTTP, or HTTPS with a TestPKI.

    tls: a TestPKI; the server presents its certificate and, with
    require_client_certificate, demands a client certificate signed by its CA.
    Other keyword arguments go to FakeTapeRest.
    """

    def __init__(self, reactor, clock=None, tls=None, require_client_certificate=False, port=0, **options):
        """port: 0 for a free one; after stop(), start() listens again on the same port."""
        self.reactor = reactor
        self.port_number = port
        self.tape = FakeTapeRest(clock if clock is not None else reactor, **options)
        self._connections = TrackingFactory(QuietSite(self.tape))
        self.tls = tls
        self.require_client_certificate = require_client_certificate
        self.port = None
        self.url = self.endpoint_url = None

    async def start(self):
        """Listen; fire with the site URL (no trailing slash)."""
        if self.tls is not None:
            endpoint = SSL4ServerEndpoint(self.reactor, self.port_number,
                                          self.tls.server_options(self.require_client_certificate), interface="127.0.0.1")
        else:
            endpoint = TCP4ServerEndpoint(self.reactor, self.port_number, interface="127.0.0.1")
        self.port = await endpoint.listen(self._connections)
        self.port_number = self.port.getHost().port
        scheme = "https" if self.tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port.getHost().port}"
        self.tape.base_url = self.url
        self.endpoint_url = self.url + self.tape.api_path
        return self.url

    def stop(self):
        """Stop listening and close every connection (hanging requests too); fires when all are gone."""
        port, self.port = self.port, None
        return self._connections.close_all(port)

    def __getattr__(self, name):
        """The fake's counters and set-up methods (calls, requests, fail_path...) straight from the server."""
        if name == "tape":
            raise AttributeError(name)
        return getattr(self.tape, name)


class TestPKI:
    """A throw-away CA with a server certificate for 127.0.0.1 and a client certificate, as PEM files.

    Files under directory: ca.pem, server.pem (certificate + key), client.pem
    and client.key (the client certificate and its key), client-proxy.pem (the
    client's certificate and key in one file, as a grid proxy file is),
    client-chain.pem (a client certificate signed by an intermediate CA the
    server does not know, its key, then the intermediate: the chain must be
    sent, as a proxy's issuer must be).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory, client_name="transferd test client"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = self._certificate("transferd test CA", ca_key, ca_key, None, ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = self._certificate("127.0.0.1", server_key, ca_key, ca, alt="127.0.0.1")
        client_key = ec.generate_private_key(ec.SECP256R1())
        client_cert = self._certificate(client_name, client_key, ca_key, ca)
        middle_key = ec.generate_private_key(ec.SECP256R1())
        middle = self._certificate("transferd test intermediate CA", middle_key, ca_key, ca, ca=True)
        chained_cert = self._certificate(client_name, client_key, middle_key, middle)

        def pem(obj):
            if hasattr(obj, "private_bytes"):
                return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
            return obj.public_bytes(serialization.Encoding.PEM)

        self.ca_pem = pem(ca)
        self.server_pem = pem(server_cert) + pem(server_key)
        self.ca_path = self._write("ca.pem", self.ca_pem)
        self.server_path = self._write("server.pem", self.server_pem)
        self.client_cert = self._write("client.pem", pem(client_cert))
        self.client_key = self._write("client.key", pem(client_key))
        self.client_proxy = self._write("client-proxy.pem", pem(client_cert) + pem(client_key))
        self.client_chain = self._write("client-chain.pem", pem(chained_cert) + pem(client_key) + pem(middle))

    def _write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    @staticmethod
    def _certificate(name, key, issuer_key, issuer, ca=False, alt=None):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer is not None else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if alt is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(alt))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def server_options(self, require_client_certificate=False):
        """Server TLS options: our certificate; with require_client_certificate, clients need one the CA signed."""
        private = ssl.PrivateCertificate.loadPEM(self.server_pem)
        if require_client_certificate:
            return private.options(ssl.Certificate.loadPEM(self.ca_pem))
        return private.options()
