"""Destination host rules checked where transferd connects: the local mover's PUT and MKCOL, by resolved address."""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.trial import unittest
from zope.interface import implementer

from tests.contract_stager import FILE_CONTENT, FILE_PRODUCT
from tests import test_local_mover
from transferd.validation import BadRequest, DestinationRules

SCHEMES = ("file", "http", "https", "davs")


@implementer(IHostnameResolver)
class ScriptedResolver:
    """Resolves names from a dict {name: [addresses]} that tests change; counts lookups. No network."""

    def __init__(self, names):
        self.names = names
        self.lookups = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.lookups.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.names.get(hostName, []):
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()
        return None


class AddressRulesTests(unittest.TestCase):
    def test_check_address(self):
        """When an address lies in a denied network, or outside the allowed ones, it is refused naming host and address."""
        rules = DestinationRules(SCHEMES, [], allowed_hosts=["*.example.org", "192.0.2.0/24"],
                                 denied_hosts=["127.0.0.0/8", "bad.example.org"])
        rules.check_address("dav.example.org", "198.51.100.7")  # allowed by name
        rules.check_address("dav.other.test", "192.0.2.9")  # allowed by address
        refused = self.assertRaises(BadRequest, rules.check_address, "dav.example.org", "127.0.0.1")
        self.assertEqual(str(refused), "destination host dav.example.org resolves to 127.0.0.1, which is not allowed here")
        self.assertRaises(BadRequest, rules.check_address, "bad.example.org", "192.0.2.1")
        refused = self.assertRaises(BadRequest, rules.check_address, "dav.other.test", "198.51.100.7")
        self.assertIn("not one this service delivers to", str(refused))


class ConnectionTimeTests(unittest.TestCase):
    """The fake WebDAV server on 127.0.0.1, reached by names that a scripted resolver answers."""

    _http = test_local_mover.LocalMoverHTTPTests  # its WebDAV server and mover helpers
    setUp, serve, mover, job = _http.setUp, _http.serve, _http.mover, _http.job

    def checked_mover(self, server, denied, names):
        self.resolver = ScriptedResolver(names)
        rules = DestinationRules(SCHEMES, [], denied_hosts=denied)
        return self.mover(server, destinations=rules, resolver=self.resolver)

    def url(self, server, name, scheme="http"):
        return f"{scheme}://{name}:{server.port.getHost().port}/store"

    @defer.inlineCallbacks
    def test_name_resolving_to_allowed_address(self):
        """When the name resolves to an address the rules allow, the product is PUT there."""
        server = yield self.serve(strict=False)
        mover = self.checked_mover(server, ["10.0.0.0/8"], {"dav.example.test": ["127.0.0.1"]})
        result = yield mover.transfer(self.job(FILE_PRODUCT, self.url(server, "dav.example.test")))
        self.assertTrue(result.success, result.msg)
        with open(server.path(f"/store/{FILE_PRODUCT}"), "rb") as stored:
            self.assertEqual(stored.read(), FILE_CONTENT)
        self.assertEqual(self.resolver.lookups, ["dav.example.test"])

    @defer.inlineCallbacks
    def test_name_resolving_to_denied_address(self):
        """When the name resolves to a denied address, the transfer fails saying so, and nothing reaches the server."""
        server = yield self.serve(strict=False)
        mover = self.checked_mover(server, ["127.0.0.0/8"], {"dav.example.test": ["127.0.0.1"]})
        result = yield mover.transfer(self.job(FILE_PRODUCT, self.url(server, "dav.example.test")))
        self.assertFalse(result.success)
        self.assertIn("destination host dav.example.test resolves to 127.0.0.1, which is not allowed here", result.msg)
        self.assertEqual(server.requests, [])

    @defer.inlineCallbacks
    def test_one_denied_address_among_several(self):
        """When one of the name's addresses is denied, the name is refused, even if another is allowed."""
        server = yield self.serve(strict=False)
        mover = self.checked_mover(server, ["10.0.0.0/8"], {"dav.example.test": ["127.0.0.1", "10.1.2.3"]})
        result = yield mover.transfer(self.job(FILE_PRODUCT, self.url(server, "dav.example.test")))
        self.assertFalse(result.success)
        self.assertIn("resolves to 10.1.2.3", result.msg)
        self.assertEqual(server.requests, [])

    @defer.inlineCallbacks
    def test_name_that_changes_between_transfers(self):
        """When a name that resolved to an allowed address later resolves to a denied one, the next transfer is refused."""
        server = yield self.serve(strict=False)
        names = {"dav.example.test": ["127.0.0.1"]}
        mover = self.checked_mover(server, ["127.0.0.2/32"], names)
        first = yield mover.transfer(self.job(FILE_PRODUCT, self.url(server, "dav.example.test") + "/one"))
        self.assertTrue(first.success, first.msg)
        yield mover.http.pool.closeCachedConnections()  # a new connection: checked again
        names["dav.example.test"] = ["127.0.0.2"]
        second = yield mover.transfer(self.job(FILE_PRODUCT, self.url(server, "dav.example.test") + "/two"))
        self.assertFalse(second.success)
        self.assertIn("resolves to 127.0.0.2", second.msg)
        self.assertEqual([request.path for request in server.requests], [f"/store/one/{FILE_PRODUCT}"])

    @defer.inlineCallbacks
    def test_mkcol_refused_before_any_request(self):
        """When a davs destination's name resolves to a denied address, not even MKCOL is sent."""
        server = yield self.serve(strict=True, tls=True)
        mover = self.checked_mover(server, ["127.0.0.0/8"], {"dav.example.test": ["127.0.0.1"]})
        result = yield mover.transfer(self.job(FILE_PRODUCT, self.url(server, "dav.example.test", "davs")))
        self.assertFalse(result.success)
        self.assertIn("resolves to 127.0.0.1", result.msg)
        self.assertEqual(server.requests, [])

    @defer.inlineCallbacks
    def test_literal_address_checked(self):
        """When the URL names a denied address itself, it is refused without a lookup."""
        server = yield self.serve(strict=False)
        mover = self.checked_mover(server, ["127.0.0.0/8"], {})
        result = yield mover.transfer(self.job(FILE_PRODUCT, server.url + "/store"))
        self.assertFalse(result.success)
        self.assertIn("resolves to 127.0.0.1", result.msg)
        self.assertEqual(self.resolver.lookups, [])

    @defer.inlineCallbacks
    def test_name_that_does_not_resolve(self):
        """When the name resolves to nothing, the transfer fails saying so."""
        server = yield self.serve(strict=False)
        mover = self.checked_mover(server, ["10.0.0.0/8"], {})
        result = yield mover.transfer(self.job(FILE_PRODUCT, self.url(server, "nowhere.example.test")))
        self.assertFalse(result.success)
        self.assertIn("does not resolve to any address", result.msg)
