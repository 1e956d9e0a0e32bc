"""Daemon.reload (SIGHUP) on a daemon built by wiring.build: all the reloadable settings or none."""

from twisted.internet import reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from transferd import wiring
from transferd.config import RELOADABLE, SCHEMA, ConfigError, load_config, needing_restart
from transferd.interfaces import IReconfigurable

ADMIN = "/DC=org/DC=example/CN=Operator"


@implementer(IReconfigurable)
class Refusing:
    """A part that refuses every new configuration, as one whose credential files are unusable would."""

    def reconfigure(self, config):
        raise ConfigError("[fts] cert: cannot read the X.509 credential /nowhere.pem")


class ReloadTests(unittest.TestCase):
    def setUp(self):
        self.workdir = self.mktemp()
        self.base = {("database", "url"): f"sqlite:///{self.workdir}/jobs.sqlite",
                     ("stager", "archive_root"): f"{self.workdir}/archive",
                     ("stager", "staging_root"): f"{self.workdir}/staging",
                     ("transfer", "denied_hosts"): "old.example.org"}
        self.daemon = wiring.build(self.config(), reactor, task.Clock())
        self.lines = []

        def observe(event):
            if event.get("log_namespace") == "transferd.wiring.Daemon":
                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def config(self, **overrides):
        return load_config(None, {**self.base, **{tuple(key.split("__")): value for key, value in overrides.items()}},
                           check_files=False)

    def settings(self):
        daemon = self.daemon
        return (daemon.access.admins, daemon.api_v1.max_batch, daemon.api.max_body_bytes,
                daemon.site.requestFactory.max_body_bytes, self.refused("old.example.org"), self.refused("bad.org"))

    def refused(self, host):
        try:
            self.daemon.destinations.check(f"https://{host}/data")
        except Exception:
            return True
        return False

    def test_reloadable_settings_apply(self):
        """The reloadable settings reach the parts that use them, and the log names them in one line."""
        self.assertTrue(self.daemon.reload(self.config(auth__admins=ADMIN, api__max_batch="7",
                                                       api__max_body_bytes="1000", transfer__denied_hosts="bad.org, worse.org")))
        self.assertEqual(self.settings(), (frozenset({ADMIN}), 7, 1000, 16777216, False, True))
        self.assertEqual(self.lines, ["configuration reloaded: [api] max_batch, [api] max_body_bytes, [auth] admins,"
                                      " [transfer] denied_hosts"])

    def test_shares_and_limits_apply_to_the_next_pass(self):
        """[scheduler] groups and weights and [limits] reach the policy that submissions and passes read."""
        self.assertTrue(self.daemon.reload(self.config(scheduler__groups="production /meerkat/Role=production",
                                                       scheduler__weights="3 production",
                                                       limits__max_staging="20",
                                                       limits__host_limits="dav.example.org 2")))
        policy = self.daemon.pipeline.policy
        self.assertIs(self.daemon.scheduler.policy, policy)
        self.assertEqual((policy.groups, policy.weight("production"), policy.limits.max_staging,
                          policy.limits.host_limit("dav.example.org"), policy.limits.host_limit("other.org")),
                         ((("production", "/meerkat/Role=production"),), 3.0, 20, 2, None))

    def test_a_refusal_changes_nothing(self):
        """When one part refuses, those that took the new settings get the running ones back, and one line says why."""
        before = self.settings()
        self.daemon.refusing = Refusing()
        self.assertFalse(self.daemon.reload(self.config(auth__admins=ADMIN, api__max_batch="7",
                                                        api__max_batch_bytes="100000", transfer__denied_hosts="bad.org")))
        self.assertEqual(self.settings(), before)
        self.assertEqual(self.lines, ["configuration not reloaded, nothing changed: [fts] cert: cannot read the X.509"
                                      " credential /nowhere.pem"])
        del self.daemon.refusing
        self.assertTrue(self.daemon.reload(self.config(auth__admins=ADMIN)))
        self.assertEqual(self.daemon.access.admins, frozenset({ADMIN}))

    def test_host_rules_the_local_mover_cannot_take(self):
        """Destination host rules where there were none at start are refused (the mover checks no addresses)."""
        del self.base[("transfer", "denied_hosts")]
        self.daemon = wiring.build(self.config(), reactor, task.Clock())
        before = self.settings()
        self.assertFalse(self.daemon.reload(self.config(auth__admins=ADMIN, transfer__allowed_hosts="ok.org")))
        self.assertEqual(self.settings(), before)
        self.assertIn("restart transferd to set the first", self.lines[-1])

    def test_restart_only_keys_named(self):
        """Each changed key that needs a restart is named in a line of its own, also on later reloads."""
        changed = self.config(reconciler__interval="5", queue__prefetch="3", auth__admins=ADMIN)
        for _ in range(2):
            self.lines.clear()
            self.daemon.reload(changed)
            self.assertEqual(self.lines[:2], [
                "[queue] prefetch changed in the configuration file: restart transferd to apply it",
                "[reconciler] interval changed in the configuration file: restart transferd to apply it"])
        self.assertEqual(self.daemon.access.admins, frozenset({ADMIN}))

    def test_reloadable_keys_are_keys(self):
        """RELOADABLE names only known keys, and needing_restart never names one of them."""
        self.assertTrue(all(key in SCHEMA.get(section, {}) for section, key in RELOADABLE))
        running, new = self.config(), self.config(auth__admins=ADMIN, log__level="debug")
        self.assertEqual(needing_restart(running, new), [])
