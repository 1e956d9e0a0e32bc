"""Configuration: defaults, the documented sample, and start-up refusals that name the key."""

import configparser
import os

from twisted.trial import unittest

from transferd.config import SCHEMA, ConfigError, load_config

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "conf", "transferd.ini")


class ConfigTests(unittest.TestCase):
    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(text)
        return path

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
        self.assertEqual(config.api.endpoint, "tcp:8080:interface=127.0.0.1")
        self.assertTrue(config.database.url.startswith("sqlite:///"))
        self.assertEqual(config.queue.url, "memory://")
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
            ("[database]\nurl = postgres://x/y\n", "[database] url"),
            ("[queue]\nurl = kafka://x\n", "[queue] url"),
            ("[stager]\ndelay = -1\n", "[stager] delay"),
            ("[stager]\nbackend = tape\n", "one of: local"),
            ("[transfer]\nfile_roots = relative/dir\n", "absolute path"),
            ("[transfer]\nallowed_schemes = ,\n", "[transfer] allowed_schemes"),
            ("[reconciler]\ninterval = 0\n", "[reconciler] interval"),
        ]
        for text, expected in cases:
            error = self.assertRaises(ConfigError, load_config, self.write(text))
            self.assertIn(expected, str(error))

    def test_unreadable_and_invalid_files(self):
        """A missing file or one that is not INI is reported as such."""
        self.assertIn("cannot read", str(self.assertRaises(ConfigError, load_config, "/nonexistent.ini")))
        self.assertIn("not valid INI", str(self.assertRaises(ConfigError, load_config, self.write("no section\n"))))

    def test_overrides(self):
        """Command-line overrides replace file values."""
        config = load_config(self.write("[api]\nendpoint = tcp:1\n"), {("api", "endpoint"): "tcp:2"})
        self.assertEqual(config.api.endpoint, "tcp:2")

    def test_production_sample_loads(self):
        """conf/transferd-production.ini is a valid configuration on MySQL and RabbitMQ."""
        config = load_config(os.path.join(os.path.dirname(SAMPLE), "transferd-production.ini"))
        self.assertTrue(config.database.url.startswith("mysql://"))
        self.assertTrue(config.queue.url.startswith("amqp://"))
