"""A client of CERN FTS3's REST API (the fts-rest-flask server), on treq.

What it speaks:

* ``GET /``: the API version, ``{"api": {"major", "minor", "patch"}, ...}``.
* ``GET /whoami``: who FTS takes us for (``user_dn``, ``method``,
  ``delegation_id``, ``vos``).  A credential FTS does not accept (an expired
  or invalid token, no client certificate) makes us "anonymous": ``method``
  "unauthenticated", no VO; FTS then answers POST /jobs with 403 "Not enough
  permissions" and GET or DELETE /jobs/... with 500.
* X.509 delegation: ``GET /delegation/{id}`` (``null`` or ``{"termination_time",
  "voms_attrs"}``), ``GET /delegation/{id}/request`` (a certificate request,
  PEM), ``PUT /delegation/{id}/credential`` (the proxy we signed, then our chain).
* ``POST /jobs`` with ``{"files": [...], "params": {...}}`` -> ``{"job_id"}``;
  409 when a deterministic id (same VO, same ``sid``) exists already; 419 when
  FTS holds no delegated credential for us, or one about to expire.
* ``GET /jobs/{id1},{id2}?files=...``: one job (200, or 404), or a list (200,
  or 207 whose entries carry their own ``http_status``, e.g. "404 Not Found").
  FTS never answers 404 for several ids: a 404 there comes from the web
  server in front of it (Apache refuses a URL path that, with FTS's script
  path, reaches 4,096 bytes: 109 job ids fit, 110 do not).  batches() keeps
  every poll's path under MAX_PATH_BYTES; a 404 for several ids splits them
  and lowers the limit.
* ``DELETE /jobs/{id}``: cancel.  200 with the job; for a job that had
  already ended, 200 whose body says ``"http_status": "304 Not Modified"``
  (older servers answer HTTP 304).

The VO (vo()) seeds FTS's deterministic job ids, so it is the one FTS gives
us (the first of /whoami's ``vos``: for a token, its issuer's host name or
groups; for a certificate without VOMS attributes, the delegation id),
learnt again when our credential changes.  A configured ``[fts] vo`` only
asserts it: when FTS says otherwise, nothing is submitted (the ids would not
match) and the error names ``[fts] vo``.  One /whoami is in flight at a time;
callers meanwhile share its answer.

Every call goes through transferd.http: bounded as a whole (the answer body,
always read, included), on the client's own connection pool.

Failures come in two kinds.  ``FTSRefused``: FTS answered 4xx, it will not do
this, and the message is FTS's own; ``FTSConflict`` (409) is one of them.
``FTSUnavailable``: the connection failed or timed out, FTS answered 5xx or
something that does not parse; trying later may work (the mover turns it into
a ServiceAway).  Credential problems are ``FTSCredentialsError``, a kind of
``FTSUnavailable``: an operator can fix them, so jobs wait instead of failing.
They are a 401, a 419 that delegating again does not cure, a token file or
certificate that cannot be read, a token whose ``exp`` has passed (checked
here, before FTS is asked), a 403 or 500 while /whoami says FTS takes us for
anonymous, and a configured VO FTS disagrees with.  A token FTS took for
anonymous is not sent again until the token file changes.  Each new credential
problem is logged as an error, once, and its end as well.
"""

import datetime
import json
import uuid
from urllib.parse import quote, urlsplit

import jwt
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

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
# Apache refuses (404) a request whose URL path, with FTS's script path, reaches 4,096 bytes; our
# poll paths stay under this, leaving 256 bytes for the script path: 103 job ids per poll at most.
MAX_PATH_BYTES = 4096 - 256
ANONYMOUS = "unauthenticated"  # /whoami's method for a caller whose credentials FTS did not take


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
    """A bearer token kept in a file something else renews; read again whenever the file changes.

    A token whose exp has passed, or that FTS took for anonymous (reject()),
    is not sent: header() raises FTSCredentialsError until the file holds
    another token.
    """

    def __init__(self, path):
        super().__init__(path)
        self._rejected = None  # (token, why)
        self._expiry = (None, None)  # (token, its exp): decoded once per token, not per request

    def text(self):
        try:
            token = self.read().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise FTSCredentialsError(
                f"cannot read the FTS token file {self.path}: {getattr(error, 'strerror', None) or error}") from None
        if not token:
            raise FTSCredentialsError(f"the FTS token file {self.path} is empty")
        return token

    def header(self, now):
        token = self.text()
        if self._rejected is not None and self._rejected[0] == token:
            raise FTSCredentialsError(self._rejected[1])
        if self._expiry[0] != token:
            self._expiry = (token, token_expiry(token))
        expiry = self._expiry[1]
        if expiry is not None and expiry <= now:
            raise FTSCredentialsError(
                f"the FTS token in {self.path} expired at {_utc_text(expiry)}; jobs wait until it is renewed")
        return b"Bearer " + token.encode("utf-8")

    def reject(self, token, why):
        """FTS does not accept token: refuse to send it again, saying why, until the file changes."""
        self._rejected = (token, why)


def token_expiry(token):
    """The exp of a JWT (epoch seconds), read without verifying it; None for other tokens."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    return float(expiry) if isinstance(expiry, (int, float)) and not isinstance(expiry, bool) else None


def _utc_text(seconds):
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class X509Credential(tls.X509Credential):
    """Our certificate and key (see transferd.tls.X509Credential); problems are FTSCredentialsErrors."""

    error = FTSCredentialsError


def parse_time(text):
    """An FTS time ("2025-01-02T03:04:05", maybe with an offset) as epoch seconds; naive means UTC."""
    moment = datetime.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


class OneAtATime:
    """Runs a coroutine function one call at a time: callers arriving while it runs share its outcome."""

    def __init__(self, function):
        self._function = function
        self._waiters = None

    def __call__(self):
        waiter = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        defer.Deferred.fromCoroutine(self._function()).addBoth(self._ended)
        return waiter

    def _ended(self, result):
        waiters, self._waiters = self._waiters, None
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


# -- the client -------------------------------------------------------------


class FTSClient:
    """Talks to one FTS3 REST endpoint.

    endpoint: "https://fts3.example.org:8446" (http:// only for tests).
    reactor, clock: do the network I/O, and time calls and delegations.
    auth: "token" (token_file) or "x509" (proxy, or cert and key), or None.
    ca_path: CAs to verify FTS (file or hashed directory); default the platform's.
    vo: the VO FTS must give us (see vo()); None: whatever /whoami says.
    delegation_min_lifetime: delegate again when FTS holds our proxy for less than this.
    delegation_lifetime: seconds the proxies we delegate last (capped by our own credential).
    request_timeout: seconds a whole call may take.
    """

    log = Logger()

    def __init__(self, endpoint, reactor, clock, auth=None, token_file=None, cert=None, key=None, proxy=None,
                 ca_path=None, vo=None, delegation_min_lifetime=21600.0, delegation_lifetime=43200.0,
                 request_timeout=60.0, metrics=None):
        self.endpoint = endpoint.rstrip("/")
        self.clock = clock
        self.auth = auth
        self.token = TokenFile(token_file) if auth == "token" else None
        self.credential = X509Credential(cert, key, proxy) if auth == "x509" else None
        if auth == "token" and not token_file:
            raise ValueError("token authentication needs a token file")
        trust_root = load_trust_root(ca_path) if ca_path else None
        self.tls_policy = ClientTLSPolicy(trust_root, self.credential)
        self.http = HTTPClient(reactor, clock, timeout=request_timeout, max_body=MAX_BODY, per_host=8,
                               tls_policy=self.tls_policy,
                               headers={"Accept": "application/json"}, service="fts", metrics=metrics)
        self.request_timeout = request_timeout
        self.delegation_min_lifetime = delegation_min_lifetime
        self.delegation_lifetime = delegation_lifetime
        self.max_path_bytes = MAX_PATH_BYTES  # lowered when the server in front refuses a shorter path
        self.configured_vo = vo or None
        self._vo = None  # (our credential when it was learnt, the VO)
        self._base_path = urlsplit(self.endpoint).path
        self.whoami = OneAtATime(self._whoami)
        self._problem = None  # the credential problem last logged
        self._delegation_lock = defer.DeferredLock()
        self._renew_delegation_at = None  # epoch seconds; None: ask FTS

    def reconfigure_credentials(self, token_file, cert, key, proxy):
        """Use other credential files (SIGHUP): checked first (ConfigError, nothing changed), then all at once.

        The connections kept open are closed, so the next request presents the new certificate; a
        certificate delegates again.
        """
        from transferd.config import ConfigError

        if self.auth == "token":
            if not token_file:
                raise ConfigError("[fts] token_file: auth = token needs one")
            token = TokenFile(token_file)
            try:
                token.text()
            except FTSCredentialsError as error:
                raise ConfigError(f"[fts] token_file: {error}") from None
            if token_file != self.token.path:
                self.token = token
        elif self.auth == "x509":
            try:
                credential = X509Credential(cert, key, proxy)
            except ValueError as error:
                raise ConfigError(f"[fts] cert/key/proxy: {error}") from None
            if (credential.cert_path, credential.key_path) == (self.credential.cert_path, self.credential.key_path):
                return
            try:
                tls.replace_credential(self.tls_policy, credential)
            except FTSCredentialsError as error:
                raise ConfigError(f"[fts] cert/key/proxy: {error}") from None
            self.credential, self._renew_delegation_at = credential, None
            self.http.pool.closeCachedConnections()

    # -- what FTS offers --------------------------------------------------

    async def version(self):
        """The server's API version: {"major", "minor", "patch"}."""
        data = await self._json("GET", "/", "ask FTS its version")
        api = data.get("api") if isinstance(data, dict) else None
        if not isinstance(api, dict):
            raise FTSUnavailable(f"{self.endpoint} does not look like FTS3: GET / has no api version")
        return api

    async def _whoami(self):
        """GET /whoami (whoami() shares one call among its callers)."""
        answer = await self._request("GET", "/whoami", authenticated=False)
        if answer.code != 200:
            raise self._credentials_failure("say who we are", answer)
        who = _json(answer)
        if not isinstance(who, dict):
            raise FTSUnavailable(f"FTS {self.endpoint} answered /whoami with {_clip(answer.body.decode('utf-8', 'replace'))}")
        return who

    async def vo(self):
        """The VO FTS puts our jobs in (it seeds deterministic job ids): /whoami's first VO, learnt per credential.

        Raises FTSCredentialsError when FTS takes us for anonymous or when it
        disagrees with the configured VO.
        """
        try:
            credential = self._credential_identity()
        except FTSCredentialsError as error:
            raise self._problem_found(error.message) from None
        if self._vo is not None and self._vo[0] == credential:
            return self._vo[1]
        who = await self.whoami()
        if who.get("method") == ANONYMOUS:
            raise self._anonymous("GET /whoami", credential if self.token is not None else None)
        vos = who.get("vos")
        if not isinstance(vos, list) or not vos or not isinstance(vos[0], str) or not vos[0]:
            raise FTSUnavailable(f"FTS {self.endpoint} names no VO for us in /whoami")
        vo = vos[0]
        if self.configured_vo is not None and vo != self.configured_vo:
            raise self._problem_found(
                f"[fts] vo = {self.configured_vo}, but FTS {self.endpoint} puts our jobs in VO {vo!r} "
                f"(GET /whoami): job ids predicted with [fts] vo would not be FTS's; nothing is submitted "
                f"until [fts] vo is {vo} or empty")
        if self._vo is None or self._vo[1] != vo:
            self.log.info("FTS {endpoint}: our VO is {vo}", endpoint=self.endpoint, vo=vo)
        self._vo = (credential, vo)
        return vo

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

    def batches(self, fts_ids, bulk_size):
        """fts_ids in groups that one status() request each can ask about: at most bulk_size, paths under the limit."""
        batch, length = [], 0
        for fts_id in fts_ids:
            cost = len(quote(fts_id, safe="").encode("utf-8")) + 1
            if batch and (len(batch) >= bulk_size or self._status_base + length + cost > self.max_path_bytes):
                yield batch
                batch, length = [], 0
            batch.append(fts_id)
            length += cost
        if batch:
            yield batch

    @property
    def _status_base(self):
        """Bytes of a status path before its ids, less one (the first id has no comma before it)."""
        return len(self._base_path.encode("utf-8")) + len("/jobs/") - 1

    async def status(self, fts_ids, file_fields=FILE_FIELDS):
        """GET /jobs/{ids}: fire with {fts id: the job, None when FTS does not know it, or an FTSError}.

        Ids FTS leaves out of its answer are left out of the result.  A 404
        for several ids means the path was too long for the server in front
        of FTS: the ids are asked about in two halves, and later polls stay
        shorter.
        """
        fts_ids = list(fts_ids)
        ids = ",".join(quote(i, safe="") for i in fts_ids)
        path = "/jobs/" + ids + ("?files=" + ",".join(file_fields) if file_fields else "")
        answer = await self._request("GET", path)
        if answer.code == 404 and len(fts_ids) > 1:
            length = len((self._base_path + "/jobs/" + ids).encode("utf-8"))
            self.max_path_bytes = min(self.max_path_bytes, length - 1)
            self.log.warn("FTS {endpoint}: a poll of {n} ids ({length} bytes of path) was refused with 404 "
                          "(too long for the server in front of FTS); polling at most {limit} bytes from now on",
                          endpoint=self.endpoint, n=len(fts_ids), length=length, limit=self.max_path_bytes)
            half = len(fts_ids) // 2
            result = await self.status(fts_ids[:half], file_fields)
            result.update(await self.status(fts_ids[half:], file_fields))
            return result
        if answer.code not in (200, 207, 404):
            raise self._failure(f"get the status of {len(fts_ids)} job(s)", answer)
        if answer.code == 404:
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
        """DELETE /jobs/{id}: fire with the job as FTS now shows it, or None when FTS does not know it.

        A job that had already ended comes back with "http_status" "304 Not
        Modified", whether FTS said so in a 200's body or with HTTP 304.
        """
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
            raise self._problem_found(
                f"FTS {self.endpoint} gave no delegation id: it did not take our certificate "
                f"(it sees {who.get('user_dn')!r})")
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
        from transferd.auth import voms
        from transferd.fts import delegation

        answer = await self._request("GET", base + "/request")
        if answer.code != 200:
            raise self._credentials_failure("get a delegation request", answer)
        loaded = self.credential.load()
        lifetime = self.delegation_lifetime
        try:
            # the shorter of our certificate's lifetime and its VOMS attributes': FTS can use the proxy no longer
            left, limited_by = voms.credential_lifetime(loaded.cert_pem + loaded.chain_pem)
        except Exception as error:
            raise FTSCredentialsError(f"cannot read our certificate's lifetime: {error}") from None
        if left <= 60:
            raise FTSCredentialsError(f"{limited_by} of our X.509 credential {self.credential.cert_path} expired")
        if left - 60 < lifetime:
            lifetime = left - 60  # a proxy cannot outlive the certificate that signs it
        if lifetime < self.delegation_min_lifetime:
            self.log.warn(
                "our X.509 credential has only {hours:.1f}h left ({limited_by}): FTS will hold a short proxy;"
                " renew it", hours=left / 3600, limited_by=limited_by)
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
        answer = await self._request(method, path, authenticated=False)
        if answer.code != 200:
            raise self._failure(what, answer)
        return _json(answer)

    async def _request(self, method, path, body=None, data=None, content_type=None, authenticated=True):
        """One whole call (request sent, answer read) within request_timeout; fire with an Answer.

        authenticated: FTS answers this only to callers it knows (not GET /
        or /whoami): a 403 or 500 makes us ask /whoami whether it took us for
        anonymous (FTSCredentialsError if it did), and a 2xx shows our
        credentials work.
        """
        url = self.endpoint + path
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        sent_token = None
        if self.token is not None:
            try:
                headers["Authorization"] = self.token.header(self.clock.seconds())
            except FTSCredentialsError as error:
                raise self._problem_found(error.message) from None
            sent_token = headers["Authorization"][len(b"Bearer "):].decode("utf-8")
        shown = f"{method} {_clip(url, 200)}"
        try:
            answer = await self.http.request(method, url, data=data, headers=headers)
        except defer.CancelledError:
            raise
        except FTSError as error:  # our credential, read while connecting
            raise self._problem_found(error.message) from None
        except Timeout as error:
            raise FTSUnavailable(f"{shown}: {error}") from None
        except Exception as error:
            raise FTSUnavailable(f"{shown}: {describe(error)}") from None
        if answer.code == 401 and self.token is not None:
            self.token.invalidate()
        if answer.code in (403, 500) and authenticated:
            await self._check_not_anonymous(f"{method} {path.split('?', 1)[0][:60]}", answer, sent_token)
        elif 200 <= answer.code < 300 and authenticated and self._problem is not None:
            self.log.info("FTS {endpoint} accepts our credentials again", endpoint=self.endpoint)
            self._problem = None
        return answer

    async def _check_not_anonymous(self, what, answer, sent_token):
        """FTS answered what with 403 or 500: raise FTSCredentialsError if it takes us for anonymous.

        sent_token: the bearer token of that request, refused from now on if so.
        """
        try:
            who = await self.whoami()
        except FTSError:
            return  # cannot tell: the answer stands as it is
        if who.get("method") == ANONYMOUS:
            raise self._anonymous(f"{what} (HTTP {answer.code}: {_message(answer)})", sent_token)

    def _anonymous(self, what, sent_token):
        """The FTSCredentialsError for FTS taking us for anonymous when it answered what; sent_token is refused."""
        if sent_token is None:
            return self._problem_found(f"FTS {self.endpoint} takes us for an anonymous user (it did not get our "
                                       f"client certificate), and answered {what}")
        why = (f"FTS {self.endpoint} does not accept our token ({self.token.path}): it takes us for an anonymous "
               f"user, and answered {what}; renew the token, or check that FTS trusts its issuer; the token is "
               f"not sent again until the token file changes")
        self.token.reject(sent_token, why)
        return self._problem_found(why)

    def _problem_found(self, message, code=None):
        """An FTSCredentialsError for message, logged as an error when it is new."""
        if message != self._problem:
            self.log.error("FTS credentials: {message}", message=message)
            self._problem = message
        return FTSCredentialsError(message, code)

    def _credential_identity(self):
        """What our credential is now (the token, or our certificate): the VO learnt is for it."""
        if self.token is not None:
            return self.token.text()
        if self.credential is not None:
            return self.credential.load().cert_pem
        return None

    def _failure(self, what, answer):
        """The exception for an answer that is not what we wanted."""
        message = f"FTS {self.endpoint} would not {what}: HTTP {answer.code}: {_message(answer)}"
        if answer.code == 409:
            return FTSConflict(_message(answer), answer.code)
        if answer.code in (401, 419):
            return self._problem_found(message, answer.code)
        if answer.code in (408, 425, 429) or not 400 <= answer.code < 500:
            return FTSUnavailable(message, answer.code)
        return FTSRefused(_message(answer), answer.code)

    def _credentials_failure(self, what, answer):
        failure = self._failure(what, answer)
        if isinstance(failure, FTSRefused):
            return self._problem_found(f"FTS {self.endpoint} would not {what}: HTTP {answer.code}: {_message(answer)}",
                                       answer.code)
        return failure
