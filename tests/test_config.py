"""Configuration: defaults, the documented sample, parsed values, rules between keys, refusals naming the key."""

import configparser
import os

from twisted.trial import unittest

from transferd.config import (
    MOVER_SCHEMES, SCHEMA, ConfigError, load_config, parse_database_url, parse_endpoint, parse_queue_url,
)

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf", "transferd.ini")
PRODUCTION = os.path.join(os.path.dirname(SAMPLE), "transferd-production.ini")


class InWorkdir:
    """Run in an empty working directory holding the default archive, as `twistd -n transferd` would."""

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.workdir, "transferd-data", "archive"))
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.workdir)

    def write(self, text):
        path = os.path.join(self.workdir, "transferd.ini")
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def refusal(self, overrides):
        """The message of the ConfigError that load_config raises for these {(section, key): text}."""
        return str(self.assertRaises(ConfigError, load_config, None, overrides))


class ConfigTests(InWorkdir, unittest.TestCase):
    def test_sample_documents_every_key_with_its_default(self):
        """conf/transferd.ini lists every known key, each with the built-in default."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(SAMPLE)
        self.assertEqual(set(parser.sections()), set(SCHEMA))
        for section, keys in SCHEMA.items():
            self.assertEqual(set(parser[section]), set(keys), section)
        self.assertEqual(load_config(SAMPLE), load_config(None))

    def test_defaults_are_embedded(self):
        """Without a file the daemon runs on SQLite, memory queue, local stager and mover on loopback."""
        config = load_config(None)
        self.assertEqual(config.api.endpoint.text, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(config.database.url.scheme, "sqlite")
        self.assertEqual(config.database.url.path, "transferd-data/transferd.sqlite")
        self.assertEqual(config.queue.url.scheme, "memory")
        self.assertEqual((config.stager.backend, config.transfer.backend), ("local", "local"))

    def test_unknown_key_named(self):
        """An unknown key stops start-up with a message naming section and key."""
        error = self.assertRaises(ConfigError, load_config, self.write("[api]\nendpont = tcp:1\n"))
        self.assertIn("[api] endpont", str(error))

    def test_unknown_section_named(self):
        """An unknown section is named."""
        error = self.assertRaises(ConfigError, load_config, self.write("[fts3]\nx = 1\n"))
        self.assertIn("[fts3]", str(error))

    def test_bad_values_named(self):
        """Values that do not parse are refused with the key and the reason."""
        cases = [
            ("[api]\nmax_body_bytes = lots\n", "[api] max_body_bytes"),
            ("[api]\nmax_body_bytes = -5\n", "positive"),
            ("[api]\nidle_timeout = inf\n", "[api] idle_timeout"),
            ("[database]\nurl = postgres://x/y\n", "[database] url"),
            ("[database]\nurl = sqlite://\n", "sqlite url needs a path"),
            ("[queue]\nurl = kafka://x\n", "[queue] url"),
            ("[queue]\nurl = amqp://h/?bogus=1\n", "unknown option 'bogus'"),
            ("[stager]\ndelay = -1\n", "[stager] delay"),
            ("[stager]\nbackend = tape\n", "one of: local"),
            ("[transfer]\nfile_roots = relative/dir\n", "absolute path"),
            ("[transfer]\nallowed_schemes = ,\n", "[transfer] allowed_schemes"),
            ("[reconciler]\ninterval = 0\n", "[reconciler] interval"),
            ("[auth]\ntoken_audiences = aud1 aud2\n", "separate audiences with commas"),
            ("[auth]\nadmins = CN=Alice,O=Example\n", "[auth] admins"),
            ("[fts]\nvo = meer kat\n", "[fts] vo"),
        ]
        for text, expected in cases:
            error = self.assertRaises(ConfigError, load_config, self.write(text))
            self.assertIn(expected, str(error))

    def test_unreadable_and_invalid_files(self):
        """A missing file, one that is not INI, or not UTF-8, is reported as such, in one line."""
        self.assertIn("cannot read", str(self.assertRaises(ConfigError, load_config, "/nonexistent.ini")))
        error = str(self.assertRaises(ConfigError, load_config, self.write("no section\n")))
        self.assertIn("not valid INI", error)
        self.assertNotIn("\n", error)
        with open(self.write(""), "wb") as handle:
            handle.write(b"[api]\nendpoint = tcp:8080:interface=127.0.0.1 \xff\n")
        self.assertIn("not UTF-8", str(self.assertRaises(ConfigError, load_config, handle.name)))

    def test_overrides(self):
        """Command-line overrides replace file values."""
        config = load_config(self.write("[api]\nendpoint = tcp:1\n"), {("api", "endpoint"): "tcp:2:interface=127.0.0.2"})
        self.assertEqual(config.api.endpoint.text, "tcp:2:interface=127.0.0.2")

    def test_production_sample_loads(self):
        """conf/transferd-production.ini is a valid configuration on MySQL and RabbitMQ (its files are elsewhere)."""
        config = load_config(PRODUCTION, check_files=False)
        self.assertEqual(config.database.url.scheme, "mysql")
        self.assertEqual(config.queue.url.scheme, "amqp")
        self.assertIn("[api] tls_cert", str(self.assertRaises(ConfigError, load_config, PRODUCTION)))

    def test_passwords_never_shown(self):
        """A refused URL is shown without its password, and so is a parsed one."""
        error = self.refusal({("database", "url"): "mysql://transferd:s3cret@db/transferd?pool_max=many"})
        self.assertIn("mysql://transferd:***@db/transferd", error)
        self.assertNotIn("s3cret", error)
        self.assertNotIn("s3cret", self.refusal({("queue", "url"): "amqp://u:s3cret@h/?bogus=1"}))
        for url in (parse_database_url("mysql://u:s3cret@h/d"), parse_queue_url("amqp://u:s3cret@h/")):
            self.assertNotIn("s3cret", str(url) + repr(url))
            self.assertEqual(url.password, "s3cret")


class DatabaseURLTests(unittest.SynchronousTestCase):
    def test_sqlite_paths(self):
        """sqlite:///relative/path is relative to the working directory; sqlite:////absolute/path is absolute."""
        self.assertEqual(parse_database_url("sqlite:///data/jobs.sqlite").path, "data/jobs.sqlite")
        self.assertEqual(parse_database_url("sqlite:////var/lib/jobs.sqlite").path, "/var/lib/jobs.sqlite")

    def test_bad_sqlite_urls_refused(self):
        """A sqlite url without a path, with a host or with options is refused in words."""
        for url, words in [("sqlite://", "needs a path"), ("sqlite:///", "needs a path"),
                           ("sqlite://host/x", "no host"), ("sqlite:///x?mode=ro", "no options")]:
            self.assertIn(words, str(self.assertRaises(ValueError, parse_database_url, url)))

    def test_url_parts_are_decoded(self):
        """When the URL carries a percent-encoded user and password, MySQLdb gets them decoded, port 3306 by default."""
        url = parse_database_url("mysql://tr%40nsfer:p%3Ass%2Fw%40rd@db.example.org/transferd")
        options = url.connect_keywords()
        self.assertEqual(
            (options["user"], options["password"], options["host"], options["port"], options["database"]),
            ("tr@nsfer", "p:ss/w@rd", "db.example.org", 3306, "transferd"),
        )
        self.assertEqual((url.pool_min, url.pool_max, options["connect_timeout"]), (2, 10, 10))

    def test_query_options(self):
        """When the URL has pool and timeout options, they reach the pool and the connection."""
        url = parse_database_url("mysql://u@h:3307/d?pool_min=1&pool_max=4&read_timeout=30")
        self.assertEqual((url.port, url.pool_min, url.pool_max), (3307, 1, 4))
        self.assertEqual(url.connect_keywords()["read_timeout"], 30)
        self.assertNotIn("write_timeout", url.connect_keywords())

    def test_bad_urls_refused(self):
        """When the URL lacks a database or user, or has an unknown or malformed option, it is refused in words."""
        for url, words in [
            ("mysql://u@h/", "database name"),
            ("mysql://h/d", "needs a user"),
            ("mysql://u@h/d?pool_size=3", "unknown mysql url option 'pool_size'"),
            ("mysql://u@h/d?pool_max=many", "must be an integer"),
            ("mysql://u@h/d?pool_min=5&pool_max=2", "must not exceed"),
            ("mysql://u@h:99999/d", "bad port"),
        ]:
            error = self.assertRaises(ValueError, parse_database_url, url)
            self.assertIn(words, str(error))


class QueueURLTests(unittest.SynchronousTestCase):
    def test_url_parts(self):
        """The URL gives host, port, credentials, a percent-encoded vhost and the query options."""
        url = parse_queue_url("amqps://user:p%40ss@mq.example.org:5673/science%2Fprod"
                              "?prefix=tx&heartbeat=10&blocked_connection_timeout=20&retry_delay=2&connection_name=n")
        self.assertEqual((url.scheme, url.tls, url.host, url.port, url.vhost, url.user, url.password),
                         ("amqps", True, "mq.example.org", 5673, "science/prod", "user", "p@ss"))
        self.assertEqual((url.prefix, url.heartbeat, url.blocked_connection_timeout, url.retry_delay,
                          url.connection_name), ("tx", 10, 20.0, 2.0, "n"))

    def test_defaults(self):
        """Without a path the vhost is "/", the prefix "transferd", the port 5672 (5671 with amqps), guest/guest."""
        for text in ("amqp://localhost", "amqp://localhost/"):
            url = parse_queue_url(text)
            self.assertEqual((url.vhost, url.prefix, url.port, url.user, url.password, url.connection_name),
                             ("/", "transferd", 5672, "guest", "guest", None))
        self.assertEqual(parse_queue_url("amqps://h").port, 5671)
        self.assertEqual(parse_queue_url("memory://").scheme, "memory")

    def test_bad_urls_refused(self):
        """A misspelt option, a bad number or port, an empty prefix, or anything after memory:// is refused."""
        for text, words in [
            ("amqp://localhost/?heartbeet=5", "unknown option 'heartbeet'"),
            ("amqp://h/?heartbeat=soon", "bad number"),
            ("amqp://h/?blocked_connection_timeout=-1", "zero or more"),
            ("amqp://h/?prefix=", "prefix may not be empty"),
            ("amqp://h:port/", "bad port"),
            ("memory://elsewhere", "memory:// takes no host"),
        ]:
            self.assertIn(words, str(self.assertRaises(ValueError, parse_queue_url, text)))


class EndpointTests(unittest.SynchronousTestCase):
    def test_kinds(self):
        """tcp, tcp6 and unix endpoints are understood with Twisted's syntax: positional, key=value, escapes."""
        cases = [
            ("tcp:8080:interface=127.0.0.1", ("tcp", 8080, "127.0.0.1", True)),
            ("tcp:port=8080:interface=0.0.0.0", ("tcp", 8080, "0.0.0.0", False)),
            ("tcp:8080:192.0.2.1", ("tcp", 8080, "192.0.2.1", False)),
            ("tcp:8080", ("tcp", 8080, "", False)),
            ("tcp6:8080:interface=\\:\\:1", ("tcp6", 8080, "::1", True)),
            ("tcp6:8080", ("tcp6", 8080, "::", False)),
            ("unix:/run/transferd.sock", ("unix", None, None, True)),
            ("stdio:", ("other", None, None, False)),
        ]
        for text, expected in cases:
            endpoint = parse_endpoint(text)
            self.assertEqual((endpoint.kind, endpoint.port, endpoint.interface, endpoint.local_only), expected, text)
            self.assertEqual(str(endpoint), text)

    def test_bad_endpoints_refused(self):
        """What Twisted cannot build, a lone trailing backslash and impossible ports are refused."""
        for text in ("nonsense:1", "tcp:http", "tcp:80:bogus=1", "tcp:80\\", "tcp:70000", "ssl:443:privateKey=/no"):
            self.assertRaises(ValueError, parse_endpoint, text)


class RuleTests(InWorkdir, unittest.TestCase):
    def test_security_rules(self):
        """Authentication that cannot work, TLS on a non-TCP endpoint, or an open unauthenticated API are refused."""
        cert = self.write("not really a certificate")
        cases = [
            ({("auth", "x509_ca_path"): self.workdir}, "[auth] x509_ca_path needs [api] tls_cert"),
            ({("auth", "token_issuers"): "https://iss https://iss/jwk"}, "[auth] token_issuers needs"),
            ({("auth", "stager_dns"): "/CN=stager"}, "[auth] stager_dns needs [auth] x509_ca_path"),
            ({("api", "tls_cert"): cert, ("api", "endpoint"): "unix:s.sock"}, "[api] tls_cert needs a tcp:"),
            ({("api", "tls_key"): cert}, "[api] tls_key is set but [api] tls_cert is not"),
            ({("api", "endpoint"): "tcp:8080:interface=0.0.0.0"}, "refusing to listen on tcp:8080:interface=0.0.0.0"),
            ({("api", "endpoint"): "tcp:8080"}, "refusing to listen on"),
            ({("api", "endpoint"): "tcp:8080", ("api", "tls_cert"): cert}, "refusing to listen on"),
        ]
        for overrides, words in cases:
            self.assertIn(words, self.refusal(overrides))

    def test_exposed_with_tls_and_authentication(self):
        """Beyond loopback, TLS and a way to authenticate are enough."""
        cert = self.write("not really a certificate")
        config = load_config(None, {("api", "endpoint"): "tcp:8443", ("api", "tls_cert"): cert,
                                    ("auth", "token_issuers"): "https://iss https://iss/jwk",
                                    ("auth", "token_audiences"): "https://transferd"})
        self.assertFalse(config.api.endpoint.local_only)

    def test_backend_rules(self):
        """Each backend's missing or contradictory settings are refused, naming the key."""
        cases = [
            ({("stager", "backend"): "callback"}, "[stager] url is required"),
            ({("stager", "backend"): "taperest"}, "[stager] url must name the Tape REST endpoint"),
            ({("stager", "backend"): "taperest", ("stager", "url"): "https://tape"}, "[stager] archive_root = "),
            ({("stager", "backend"): "taperest", ("stager", "url"): "https://tape",
              ("stager", "archive_root"): "/pnfs/x", ("stager", "key"): "/k.pem"}, "[stager] key is set but cert"),
            ({("transfer", "allowed_schemes"): "file, gsiftp"}, "[transfer] allowed_schemes lists gsiftp"),
            ({("transfer", "backend"): "fts", ("transfer", "allowed_schemes"): "davs"},
             "[transfer] backend = fts needs [fts] endpoint"),
        ]
        for overrides, words in cases:
            self.assertIn(words, self.refusal(overrides))

    def test_mover_schemes_match_the_movers(self):
        """The schemes config.py allows per [transfer] backend are those the movers write."""
        from transferd.movers.fts import FTSMover
        from transferd.movers.local import LocalMover

        self.assertEqual(MOVER_SCHEMES, {"local": LocalMover.schemes, "fts": FTSMover.schemes})

    def test_paths(self):
        """Files the configuration names must be there, and directories it makes must be makeable."""
        plain_file = self.write("x")
        cases = [
            ({("stager", "archive_root"): "nowhere"}, "[stager] archive_root 'nowhere' is not a directory"),
            ({("stager", "staging_root"): os.path.join(plain_file, "staging")}, "[stager] staging_root"),
            ({("database", "url"): "sqlite:///" + os.path.join(plain_file, "jobs.sqlite")}, "[database] url"),
            ({("database", "url"): "sqlite:///" + self.workdir}, "names a directory"),
            ({("api", "tls_cert"): "/no/such/cert.pem"}, "[api] tls_cert = '/no/such/cert.pem' is not a file"),
            ({("auth", "audit_log"): "/no/such/dir/audit.log"}, "[auth] audit_log"),
            ({("auth", "audit_log"): self.workdir}, "is a directory"),
            ({("stager", "backend"): "taperest", ("stager", "url"): "https://tape", ("stager", "archive_root"): "/p",
              ("stager", "token_file"): "/no/such/token"}, "[stager] token_file '/no/such/token' is not a file"),
            ({("transfer", "backend"): "fts", ("transfer", "allowed_schemes"): "davs",
              ("fts", "endpoint"): "https://fts:8446", ("fts", "proxy"): "/no/such/proxy"},
             "[fts] proxy = '/no/such/proxy' does not exist"),
        ]
        for overrides, words in cases:
            self.assertIn(words, self.refusal(overrides))
            load_config(None, overrides, check_files=False)
