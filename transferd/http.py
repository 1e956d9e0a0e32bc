"""The one HTTP client of transferd's backends, and how to word what went wrong.

The callback and Tape REST stagers, the local mover's PUTs, the FTS client
and the reference stager's callbacks all call through HTTPClient: its own
connection pool, a TLS policy, one time limit for the whole call (the answer
body included: it is always read, and refused past a size), and stop(),
which cancels the calls in flight and closes the pool.  treq and
twisted.web.client do the work underneath.  Connection failures reach the
caller as they are (describe() words them); a call over its time limit fails
with Timeout.

Given destination rules (validation.DestinationRules), an HTTPClient checks
where it connects when it connects: CheckedEndpointFactory resolves the
URL's host, checks every address it resolves to, and connects to a checked
address only, so a name that resolves to a denied address, or resolves
differently from one moment to the next, never reaches one
(DestinationRefused).

Given metrics (transferd.metrics.Metrics), an HTTPClient counts every call
by its service (the name its user gives: "fts", "stager"...) and outcome
(the answer's status class, or timeout, refused, error, cancelled), with
its duration.
"""

import dataclasses
import ipaddress
import json as jsonlib

import treq
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from transferd.validation import BadRequest

MAX_BODY = 16 << 20  # bytes of an answer body accepted by default


class Timeout(Exception):
    """The whole call (request sent, answer read) took longer than its limit."""

    def __init__(self, seconds):
        super().__init__(f"no complete answer within {seconds:g}s")
        self.seconds = seconds


class TooLarge(Exception):
    """The answer body is larger than the client accepts."""


class DestinationRefused(Exception):
    """The URL's host resolves to an address the destination rules refuse (or to none); nothing was sent."""


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects the addresses of one name resolution; done fires with their text."""

    def __init__(self):
        self.addresses = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        self.addresses.append(address.host)

    def resolutionComplete(self):
        self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """Resolve, check every address, then connect to the checked addresses in turn (TLS for https)."""

    def __init__(self, factory, uri):
        self.factory = factory
        self.uri = uri

    def connect(self, protocol_factory):
        return defer.Deferred.fromCoroutine(self._connect(protocol_factory))

    async def _connect(self, protocol_factory):
        factory, host, port = self.factory, self.uri.host.decode("idna"), self.uri.port
        host = host.strip("[]")
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            receiver = _Addresses()
            factory.resolver.resolveHostName(receiver, host, port)
            addresses = await receiver.done
        if not addresses:
            raise DestinationRefused(f"destination host {host} does not resolve to any address")
        for address in addresses:
            try:
                factory.rules.check_address(host, address)
            except BadRequest as refused:
                raise DestinationRefused(str(refused)) from None
        failure = None
        for address in addresses:
            kind = TCP6ClientEndpoint if ipaddress.ip_address(address).version == 6 else TCP4ClientEndpoint
            endpoint = kind(factory.reactor, address, port, timeout=factory.connect_timeout)
            if self.uri.scheme == b"https":
                endpoint = wrapClientTLS(factory.tls_policy.creatorForNetloc(self.uri.host, port), endpoint)
            try:
                return await endpoint.connect(protocol_factory)
            except defer.CancelledError:
                raise
            except Exception as error:
                failure = error
        raise failure


@implementer(IAgentEndpointFactory)
class CheckedEndpointFactory:
    """The Agent's endpoints when destination rules apply: see _CheckedEndpoint."""

    def __init__(self, reactor, rules, tls_policy, resolver=None, connect_timeout=30):
        self.reactor = reactor
        self.rules = rules
        self.tls_policy = tls_policy
        self.resolver = resolver if resolver is not None else reactor.nameResolver
        self.connect_timeout = connect_timeout

    def endpointForURI(self, uri):
        return _CheckedEndpoint(self, uri)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One whole HTTP answer."""

    code: int
    phrase: str
    headers: object  # twisted.web.http_headers.Headers
    body: bytes

    def json(self):
        """The body as JSON; ValueError when it is not JSON."""
        return jsonlib.loads(self.body.decode("utf-8"))

    def header(self, name):
        """The first value of a header, as text, or ""."""
        return (self.headers.getRawHeaders(name) or [""])[0]


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" line per connection


class _Body(Protocol):
    """Collects an answer body up to limit bytes; cancelling drops the connection.

    ended fires once the body is over, however it ended: by then the pool
    has its connection back, if it was kept.
    """

    def __init__(self, limit):
        self.limit = limit
        self.chunks, self.size = [], 0
        self.done = defer.Deferred(self._cancel)
        self.ended = defer.Deferred()

    def dataReceived(self, data):
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(TooLarge(f"the answer is larger than {self.limit} bytes"))
            self.transport.loseConnection()
            return
        self.chunks.append(data)

    def connectionLost(self, reason=None):
        self.ended.callback(None)
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)

    def _cancel(self, done):
        done.errback(defer.CancelledError())
        if self.transport is not None:
            self.transport.loseConnection()


class HTTPClient:
    """Whole HTTP calls on a pool of our own, each within a time limit; stop() cancels them and closes the pool.

    reactor does the I/O and clock times the calls.  tls_policy: an
    IPolicyForHTTPS (transferd.tls.ClientTLSPolicy) for https URLs; None
    verifies servers against the system's CAs.  headers are sent with every
    call (a call's own headers win).  destinations: DestinationRules that
    every address connected to must pass (CheckedEndpointFactory), names
    resolved by resolver (an IHostnameResolver; default the reactor's).
    service: what the calls go to, in metrics (transferd.metrics.SERVICES);
    metrics: where calls are counted (None: nowhere).
    """

    def __init__(self, reactor, clock, timeout=60.0, tls_policy=None, max_body=MAX_BODY, per_host=2,
                 headers=None, destinations=None, resolver=None, service=None, metrics=None):
        self.clock = clock
        self.service = service
        self.metrics = metrics
        if metrics is not None:
            metrics.calls_to(self.service)
        self.timeout = timeout
        self.max_body = max_body
        self.headers = dict(headers or {})
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = per_host
        self.pool._factory = _QuietFactory
        tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        if destinations is not None and destinations.restricts_addresses:
            endpoints = CheckedEndpointFactory(reactor, destinations, tls_policy, resolver)
            agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)
        else:
            agent = Agent(reactor, contextFactory=tls_policy, pool=self.pool)
        self._treq = treq.client.HTTPClient(agent)
        self._calls = set()
        self._bodies = set()  # answer bodies still arriving
        self._stopped = False

    def request(self, method, url, json=None, data=None, headers=None, timeout=None):
        """One whole call; fires with its Answer.

        json: an object sent as JSON; data: bytes or an IBodyProducer (a
        file's PUT); timeout: this call's limit in seconds (default: the
        client's).  Redirects are not followed.
        """
        if self._stopped:
            return defer.fail(defer.CancelledError(f"{method} {url}: the HTTP client has stopped"))
        limit = self.timeout if timeout is None else timeout
        call = defer.Deferred.fromCoroutine(self._whole(method, url, json, data, {**self.headers, **(headers or {})}))
        call.addTimeout(limit, self.clock, onTimeoutCancel=_timed_out)
        self._calls.add(call)
        call.addBoth(self._ended, call)
        if self.metrics is not None:
            call.addBoth(self._counted, self.clock.seconds())
        return call

    def stop(self):
        """Cancel the calls in flight (they fail with CancelledError), take no more, close the pool."""
        self._stopped = True
        for call in list(self._calls):
            call.cancel()
        return defer.Deferred.fromCoroutine(self._close())

    async def _close(self):
        await defer.DeferredList([body.ended for body in self._bodies])
        await self.pool.closeCachedConnections()

    async def _whole(self, method, url, json, data, headers):
        options = {"json": json} if json is not None else {"data": data}
        try:
            response = await self._treq.request(method, url, headers=headers, allow_redirects=False,
                                                unbuffered=True, **options)
        except Exception as error:
            if any(reason.check(defer.CancelledError) for reason in getattr(error, "reasons", ())):
                raise defer.CancelledError() from None  # Agent words a cancelled call as a failed one
            raise
        body = _Body(self.max_body)
        self._bodies.add(body)
        body.ended.addCallback(lambda _: self._bodies.discard(body))
        response.deliverBody(body)
        content = await body.done
        return Answer(response.code, response.phrase.decode("latin-1", "replace"), response.headers, content)

    def _ended(self, result, call):
        self._calls.discard(call)
        return result

    def _counted(self, result, started):
        self.metrics.called(self.service, call_outcome(result), self.clock.seconds() - started)
        return result


def call_outcome(result):
    """How a call ended, for metrics: the answer's status class, or why there was none."""
    if isinstance(result, Answer):
        return f"{result.code // 100}xx" if 200 <= result.code < 600 else "error"
    if result.check(Timeout):
        return "timeout"
    if result.check(DestinationRefused):
        return "refused"
    if result.check(defer.CancelledError):
        return "cancelled"
    return "error"


def _timed_out(result, seconds):
    raise Timeout(seconds)


def describe(error):
    """A short human description of why a request failed (treq/Agent wrap the real causes in a list)."""
    reasons = getattr(error, "reasons", None)  # ResponseNeverReceived, RequestTransmissionFailed...
    if reasons:
        return "; ".join(describe(reason.value) for reason in reasons)
    return str(error) or type(error).__name__


def answer_message(body, limit=500):
    """The server's own words from an answer body: its JSON "msg", else the text, shortened."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = jsonlib.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("msg"), str):
        text = data["msg"]
    return text[:limit] or "(no message)"
