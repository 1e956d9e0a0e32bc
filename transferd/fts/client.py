"""A client of CERN FTS3's REST API (the fts-rest-flask server), on treq.

What it speaks:

* ``GET /``: the API version, ``{"api": {"major", "minor", "patch"}, ...}``.
* ``GET /whoami``: who FTS takes us for (``delegation_id``, ``vos``, ``base_id``).
* X.509 delegation: ``GET /delegation/{id}`` (``null`` or ``{"termination_time"}``),
  ``GET /delegation/{id}/request`` (a certificate request, PEM), ``PUT
  /delegation/{id}/credential`` (the proxy we signed, then our chain).
* ``POST /jobs`` with ``{"files": [...], "params": {...}}`` -> ``{"job_id"}``;
  409 when a deterministic id (same VO, same ``sid``) exists already; 419 when
  FTS holds no delegated credential for us, or one about to expire.
* ``GET /jobs/{id1},{id2}?files=...``: one job (200, or 404), or a list (200,
  or 207 whose entries carry their own ``http_status``, e.g. "404 Not Found").
* ``DELETE /jobs/{id}``: cancel (200; 304 when the job had already ended).

Every call goes through transferd.http: bounded as a whole (the answer body,
always read, included), on the client's own connection pool.

Failures come in two kinds.  ``FTSRefused``: FTS answered 4xx, it will not do
this, and the message is FTS's own; ``FTSConflict`` (409) is one of them.
``FTSUnavailable``: the connection failed or timed out, FTS answered 5xx or
something that does not parse; trying later may work (the mover turns it into
a ServiceAway).  Credential problems (a
401, a 419 that delegating again does not cure, a token file or certificate
that cannot be read) are ``FTSCredentialsError``, a kind of
``FTSUnavailable``: an operator can fix them, so jobs wait instead of failing.
"""

import datetime
import json
import uuid
from urllib.parse import quote

from twisted.internet import defer
from twisted.logger import Logger

from transferd import tls
from transferd.http import HTTPClient, Timeout, describe
from transferd.tls import ClientTLSPolicy, WatchedFile, load_trust_root

# fts-rest-flask's namespace for deterministic job ids: a job submitted with
# id_generator "deterministic" gets uuid5(uuid5(BASE_ID, vo), sid).
BASE_ID = uuid.UUID("01874efb-4735-4595-bc9c-591aef8240c9")

ACTIVE_STATES = frozenset({
    "STAGING", "SUBMITTED", "READY", "ACTIVE", "DELETE", "ARCHIVING", "QOS_TRANSITION", "QOS_REQUEST_SUBMITTED",
})
TERMINAL_STATES = frozenset({"FINISHED", "FAILED", "FINISHEDDIRTY", "CANCELED"})

# The file fields asked for when polling: enough to tell a user what went wrong.
FILE_FIELDS = (
    "file_id", "file_state", "reason", "source_surl", "dest_surl", "filesize", "checksum",
    "file_metadata", "start_time", "finish_time",
)
MAX_BODY = 256 << 20  # a bulk poll of products with many files answers at length


def deterministic_job_id(vo, sid):
    """The job id FTS gives a submission with id_generator "deterministic" and this sid, in this VO."""
    return str(uuid.uuid5(uuid.uuid5(BASE_ID, vo), str(sid)))


class FTSError(Exception):
    """Something FTS did or did not do; message is what to tell a person."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message = message
        self.code = code


class FTSUnavailable(FTSError):
    """FTS could not be reached or did not give a usable answer: trying later may work."""


class FTSCredentialsError(FTSUnavailable):
    """Our credentials are missing, unreadable or not accepted: an operator must act; jobs wait."""


class FTSRefused(FTSError):
    """FTS answered 4xx: it will not do this; message is FTS's reason."""


class FTSConflict(FTSRefused):
    """409: FTS already has a job with this deterministic id."""


def _json(answer):
    """An answer's JSON body; one that does not parse means FTS is not itself."""
    try:
        return answer.json()
    except ValueError:
        raise FTSUnavailable(f"FTS answered HTTP {answer.code} with a body that is not JSON: "
                             f"{_clip(answer.body.decode('utf-8', 'replace'))}") from None


def _message(answer):
    """FTS's own words about an error: its JSON "message" (or "http_message"), else the text."""
    text = answer.body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return _clip(text) or f"HTTP {answer.code}"
    if isinstance(data, dict):
        for key in ("message", "http_message", "detail", "status"):
            if data.get(key):
                return _clip(str(data[key]))
    return _clip(text) or f"HTTP {answer.code}"


def _clip(text, limit=1000):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- credentials ------------------------------------------------------------


class TokenFile(WatchedFile):
    """A bearer token kept in a file something else renews; read again whenever the file changes."""

    def header(self):
        try:
            token = self.read().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise FTSCredentialsError(
                f"cannot read the FTS token file {self.path}: {getattr(error, 'strerror', None) or error}") from None
        if not token:
            raise FTSCredentialsError(f"the FTS token file {self.path} is empty")
        return b"Bearer " + token.encode("utf-8")


class X509Credential(tls.X509Credential):
    """Our certificate and key (see transferd.tls.X509Credential); problems are FTSCredentialsErrors."""

    error = FTSCredentialsError


def parse_time(text):
    """An FTS time ("2025-01-02T03:04:05", maybe with an offset) as epoch seconds; naive means UTC."""
    moment = datetime.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


# -- the client -------------------------------------------------------------


class FTSClient:
    """Talks to one FTS3 REST endpoint.

    endpoint: "https://fts3.example.org:8446" (http:// only for tests).
    reactor, clock: do the network I/O, and time calls and delegations.
    auth: "token" (token_file) or "x509" (proxy, or cert and key), or None.
    ca_path: CAs to verify FTS (file or hashed directory); default the platform's.
    vo: the VO jobs run in; learnt from /whoami when not given.
    delegation_min_lifetime: delegate again when FTS holds our proxy for less than this.
    delegation_lifetime: seconds the proxies we delegate last (capped by our own credential).
    request_timeout: seconds a whole call may take.
    """

    log = Logger()

    def __init__(self, endpoint, reactor, clock, auth=None, token_file=None, cert=None, key=None, proxy=None,
                 ca_path=None, vo=None, delegation_min_lifetime=21600.0, delegation_lifetime=43200.0,
                 request_timeout=60.0):
        self.endpoint = endpoint.rstrip("/")
        self.clock = clock
        self.auth = auth
        self.token = TokenFile(token_file) if auth == "token" else None
        self.credential = X509Credential(cert, key, proxy) if auth == "x509" else None
        if auth == "token" and not token_file:
            raise ValueError("token authentication needs a token file")
        trust_root = load_trust_root(ca_path) if ca_path else None
        self.http = HTTPClient(reactor, clock, timeout=request_timeout, max_body=MAX_BODY, per_host=8,
                               tls_policy=ClientTLSPolicy(trust_root, self.credential),
                               headers={"Accept": "application/json"})
        self.request_timeout = request_timeout
        self.delegation_min_lifetime = delegation_min_lifetime
        self.delegation_lifetime = delegation_lifetime
        self._vo = vo
        self._delegation_lock = defer.DeferredLock()
        self._renew_delegation_at = None  # epoch seconds; None: ask FTS

    # -- what FTS offers --------------------------------------------------

    async def version(self):
        """The server's API version: {"major", "minor", "patch"}."""
        data = await self._json("GET", "/", "ask FTS its version")
        api = data.get("api") if isinstance(data, dict) else None
        if not isinstance(api, dict):
            raise FTSUnavailable(f"{self.endpoint} does not look like FTS3: GET / has no api version")
        return api

    async def whoami(self):
        """Who FTS takes us for; a refusal here means FTS does not accept our credentials."""
        answer = await self._request("GET", "/whoami")
        if answer.code != 200:
            raise self._credentials_failure("say who we are", answer)
        return _json(answer)

    async def vo(self):
        """The VO our jobs run in (it seeds deterministic job ids): configured, or FTS's first for us."""
        if self._vo is None:
            who = await self.whoami()
            vos = who.get("vos") if isinstance(who, dict) else None
            if not vos:
                raise FTSUnavailable(f"FTS {self.endpoint} names no VO for us in /whoami; set [fts] vo")
            self._vo = str(vos[0])
            self.log.info("FTS {endpoint}: our VO is {vo}", endpoint=self.endpoint, vo=self._vo)
        return self._vo

    async def submit(self, job):
        """POST /jobs; fire with FTS's job id.

        With X.509, our proxy is delegated first when FTS's copy is missing or
        expiring, and a 419 answer makes us delegate again and retry once.
        """
        if self.auth == "x509":
            await self.ensure_delegation()
        answer = await self._request("POST", "/jobs", body=job)
        if answer.code == 419 and self.auth == "x509":
            self.log.info("FTS {endpoint} wants a fresh delegation ({why}); delegating again",
                          endpoint=self.endpoint, why=_message(answer))
            await self.ensure_delegation(force=True)
            answer = await self._request("POST", "/jobs", body=job)
        if 200 <= answer.code < 300:
            data = _json(answer)
            if not isinstance(data, dict) or not data.get("job_id"):
                shown = _clip(answer.body.decode("utf-8", "replace"))
                raise FTSUnavailable(f"FTS accepted the job but sent no job_id: {shown}")
            return str(data["job_id"])
        raise self._failure("submit a job", answer)

    async def status(self, fts_ids, file_fields=FILE_FIELDS):
        """GET /jobs/{ids}: fire with {fts id: the job, None when FTS does not know it, or an FTSError}.

        Ids FTS leaves out of its answer are left out of the result.
        """
        fts_ids = list(fts_ids)
        path = "/jobs/" + ",".join(quote(i, safe="") for i in fts_ids)
        if file_fields:
            path += "?files=" + ",".join(file_fields)
        answer = await self._request("GET", path)
        if answer.code not in (200, 207, 404):
            raise self._failure(f"get the status of {len(fts_ids)} job(s)", answer)
        if answer.code == 404 and len(fts_ids) == 1:
            # Only a 404 that names the job means "unknown job", not a wrong URL.
            return {fts_ids[0]: None} if fts_ids[0].encode() in answer.body else {}
        data = _json(answer)
        entries = data if isinstance(data, list) else [data]
        result = {}
        for entry in entries:
            if not isinstance(entry, dict) or not entry.get("job_id"):
                continue
            http_status = str(entry.get("http_status") or ("200 Ok" if answer.code == 200 else ""))
            if http_status.startswith("2"):
                result[entry["job_id"]] = entry
            elif http_status.startswith("404"):
                result[entry["job_id"]] = None
            else:
                code = int(http_status[:3]) if http_status[:3].isdigit() else None
                result[entry["job_id"]] = FTSRefused(
                    f"FTS answered {http_status or 'an error'} for job {entry['job_id']}: "
                    f"{entry.get('http_message') or 'no reason given'}", code)
        return result

    async def cancel(self, fts_id):
        """DELETE /jobs/{id}: fire with the job as FTS now shows it ({"http_status": "304 ..."} when it
        had already ended), or None when FTS does not know it."""
        answer = await self._request("DELETE", "/jobs/" + quote(fts_id, safe=""))
        if answer.code == 304:
            return {"job_id": fts_id, "http_status": "304 Not Modified"}
        if 200 <= answer.code < 300:
            data = _json(answer) if answer.body.strip() else {}
            return data if isinstance(data, dict) else {"job_id": fts_id, "http_status": "200 Ok"}
        if answer.code == 404 and fts_id.encode() in answer.body:
            return None
        raise self._failure(f"cancel job {fts_id}", answer)

    def stop(self):
        """Cancel the calls in flight and close the connections."""
        return self.http.stop()

    # -- delegation -------------------------------------------------------

    def ensure_delegation(self, force=False):
        """Make sure FTS holds a proxy of ours with delegation_min_lifetime left (force: delegate now)."""
        return self._delegation_lock.run(lambda: defer.Deferred.fromCoroutine(self._delegate(force)))

    async def _delegate(self, force):
        now = self.clock.seconds()
        if not force and self._renew_delegation_at is not None and now < self._renew_delegation_at:
            return
        who = await self.whoami()
        delegation_id = who.get("delegation_id") if isinstance(who, dict) else None
        if not delegation_id:
            raise FTSCredentialsError(
                f"FTS {self.endpoint} gave no delegation id: it did not take our certificate "
                f"(it sees {who.get('user_dn') if isinstance(who, dict) else who!r})")
        base = "/delegation/" + quote(str(delegation_id), safe="")
        if not force:
            expiry = await self._delegated_expiry(base)
            if expiry is not None and expiry - now > self.delegation_min_lifetime:
                self._remember_delegation(now, expiry)
                return
        await self._delegate_now(base, delegation_id, now)

    async def _delegated_expiry(self, base):
        answer = await self._request("GET", base)
        if answer.code != 200:
            raise self._credentials_failure("read our delegation", answer)
        info = _json(answer)
        if not isinstance(info, dict) or not info.get("termination_time"):
            return None
        try:
            return parse_time(info["termination_time"])
        except ValueError:
            return None

    async def _delegate_now(self, base, delegation_id, now):
        from transferd.fts import delegation

        answer = await self._request("GET", base + "/request")
        if answer.code != 200:
            raise self._credentials_failure("get a delegation request", answer)
        loaded = self.credential.load()
        lifetime = self.delegation_lifetime
        try:
            left = delegation.remaining_lifetime(loaded.cert_pem)
        except Exception as error:
            raise FTSCredentialsError(f"cannot read our certificate's lifetime: {error}") from None
        if left <= 60:
            raise FTSCredentialsError(f"our X.509 credential {self.credential.cert_path} has expired")
        if left - 60 < lifetime:
            lifetime = left - 60  # a proxy cannot outlive the certificate that signs it
        if lifetime < self.delegation_min_lifetime:
            self.log.warn(
                "our X.509 credential has only {hours:.1f}h left: FTS will hold a short proxy; renew it",
                hours=left / 3600)
        try:
            proxy = delegation.sign_proxy_request(answer.body, loaded.cert_pem, loaded.key_pem,
                                                  loaded.chain_pem, lifetime_seconds=int(lifetime))
        except Exception as error:
            raise FTSCredentialsError(f"cannot sign FTS's delegation request: {error}") from None
        answer = await self._request("PUT", base + "/credential", data=proxy, content_type="application/x-pem-file")
        if not 200 <= answer.code < 300:
            raise self._credentials_failure("delegate our proxy", answer)
        self._remember_delegation(now, now + lifetime)
        self.log.info("delegated a {hours:.1f}h proxy to FTS {endpoint} (delegation id {delegation_id})",
                      hours=lifetime / 3600, endpoint=self.endpoint, delegation_id=delegation_id)

    def _remember_delegation(self, now, expiry):
        # Ask again once less than the minimum is left (or half-way, for short proxies).
        self._renew_delegation_at = expiry - max(self.delegation_min_lifetime, (expiry - now) / 2)

    # -- plumbing ---------------------------------------------------------

    async def _json(self, method, path, what):
        answer = await self._request(method, path)
        if answer.code != 200:
            raise self._failure(what, answer)
        return _json(answer)

    async def _request(self, method, path, body=None, data=None, content_type=None):
        """One whole call (request sent, answer read) within request_timeout; fire with an Answer."""
        url = self.endpoint + path
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        if self.token is not None:
            headers["Authorization"] = self.token.header()
        shown = f"{method} {_clip(url, 200)}"
        try:
            answer = await self.http.request(method, url, data=data, headers=headers)
        except (defer.CancelledError, FTSError):
            raise  # FTSError: our credential, read while connecting
        except Timeout as error:
            raise FTSUnavailable(f"{shown}: {error}") from None
        except Exception as error:
            raise FTSUnavailable(f"{shown}: {describe(error)}") from None
        if answer.code == 401 and self.token is not None:
            self.token.invalidate()
        return answer

    def _failure(self, what, answer):
        """The exception for an answer that is not what we wanted."""
        message = f"FTS {self.endpoint} would not {what}: HTTP {answer.code}: {_message(answer)}"
        if answer.code == 409:
            return FTSConflict(_message(answer), answer.code)
        if answer.code in (401, 419):
            return FTSCredentialsError(message, answer.code)
        if answer.code in (408, 425, 429) or not 400 <= answer.code < 500:
            return FTSUnavailable(message, answer.code)
        return FTSRefused(_message(answer), answer.code)

    def _credentials_failure(self, what, answer):
        failure = self._failure(what, answer)
        if isinstance(failure, FTSRefused):
            return FTSCredentialsError(f"FTS {self.endpoint} would not {what}: HTTP {answer.code}: "
                                       f"{_message(answer)}", answer.code)
        return failure
