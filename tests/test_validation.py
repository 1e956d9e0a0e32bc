"""Destination rules: schemes, file roots, host allow and deny lists, tricky host spellings."""

from twisted.trial import unittest

from transferd.config import ConfigError, load_config
from transferd.validation import BadRequest, DestinationRules, host_pattern


class DestinationRulesTests(unittest.TestCase):
    def rules(self, allowed=(), denied=()):
        return DestinationRules(("davs", "https", "file"), ("/srv/deliveries",), allowed, denied)

    def assertRefused(self, rules, url, text):
        error = self.assertRaises(BadRequest, rules.check, url)
        self.assertIn(text, str(error))

    def test_no_host_lists_accept_any_host(self):
        """Without allowed_hosts and denied_hosts every host name passes; the URL comes back unchanged."""
        url = "davs://dav.example.org:2880/data/x"
        self.assertEqual(self.rules().check(url), url)

    def test_allow_list(self):
        """Names, *.domain (subdomains only) and networks (literal addresses only) are allowed; nothing else."""
        rules = self.rules(allowed=("dav.other.org", "*.example.org", "192.0.2.0/24", "2001:db8::/32"))
        for url in ("davs://dav.other.org/x", "davs://DAV.Other.Org./x", "davs://a.example.org/x",
                    "davs://b.a.example.org/x", "https://192.0.2.9/x", "https://[2001:db8::1]/x"):
            self.assertEqual(rules.check(url), url)
        for url in ("davs://example.org/x", "davs://evil-example.org/x", "davs://192.0.3.1/x",
                    "davs://other.org/x", "https://[2001:db9::1]/x"):
            self.assertRefused(rules, url, "is not one this service delivers to")

    def test_deny_list_wins(self):
        """A denied host is refused even when the allow list matches it."""
        rules = self.rules(allowed=("*.example.org",), denied=("bad.example.org", "127.0.0.0/8", "::1"))
        self.assertRefused(rules, "davs://bad.example.org/x", "is not allowed here")
        self.assertRefused(rules, "davs://bad.example.org./x", "is not allowed here")
        self.assertEqual(rules.check("davs://good.example.org/x"), "davs://good.example.org/x")

    def test_other_spellings_of_a_denied_address(self):
        """IPv4-mapped IPv6 matches its IPv4 network; numeric names that are not dotted quads are refused."""
        rules = self.rules(denied=("127.0.0.0/8",))
        self.assertRefused(rules, "https://127.0.0.1/x", "is not allowed here")
        self.assertRefused(rules, "https://[::ffff:127.0.0.1]/x", "is not allowed here")
        for host in ("2130706433", "0x7f.1", "127.1", "0177.0.0.1.", "0x7f000001"):
            self.assertRefused(rules, f"https://{host}/x", "is not a valid host name or IP address")

    def test_file_urls_have_no_host_to_check(self):
        """file:// destinations are checked against file_roots, not against the host lists."""
        rules = self.rules(allowed=("dav.example.org",))
        self.assertEqual(rules.check("file:///srv/deliveries/x"), "file:///srv/deliveries/x")
        self.assertRefused(rules, "file:///etc/x", "must lie under")

    def test_path_rules_still_apply(self):
        """'..' and NUL are refused whatever the host lists say."""
        rules = self.rules()
        self.assertRefused(rules, "davs://dav.example.org/a/../b", "'..'")
        self.assertRefused(rules, "davs://dav.example.org/a%2e%2e/b/%2e%2e/c", "'..'")
        self.assertRefused(rules, "davs://dav.example.org/a%00b", "control characters")

    def test_bad_patterns_refused_at_start(self):
        """A malformed pattern stops start-up, naming the key."""
        for pattern in ("*", "a*.example.org", "10.0.0.0/33"):
            self.assertRaises(ValueError, host_pattern, pattern)
        error = self.assertRaises(ConfigError, load_config, None, {("transfer", "denied_hosts"): "10.0.0.0/33"})
        self.assertIn("[transfer] denied_hosts", str(error))
