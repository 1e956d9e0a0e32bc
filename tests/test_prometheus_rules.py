"""conf/prometheus-alerts.yml parses as Prometheus rules, and names only metrics transferd exports."""

import os
import re

import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from tests.harness import Harness

RULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf", "prometheus-alerts.yml")


class AlertRulesTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_rules_parse_and_name_exported_metrics(self):
        """Every rule has alert, expr, severity and summary; every transferd_ metric in an expr is in a scrape."""
        with open(RULES) as handle:
            document = yaml.safe_load(handle)
        rules = [rule for group in document["groups"] for rule in group["rules"]]
        self.assertTrue(rules)
        named = set()
        for rule in rules:
            self.assertLessEqual({"alert", "expr", "labels", "annotations"}, set(rule), rule)
            self.assertIn(rule["labels"]["severity"], ("critical", "warning", "info"), rule)
            self.assertTrue(rule["annotations"]["summary"], rule)
            if "for" in rule:
                self.assertRegex(rule["for"], r"\A\d+[smh]\Z")
            named |= set(re.findall(r"\btransferd_[a-z_]+", rule["expr"]))
        h = Harness(self.mktemp())
        yield h.start(consume=False)
        self.addCleanup(h.close)
        self.addCleanup(h.pipeline.flush_holds)
        response, body = yield h.request("GET", "/metrics")
        exported = {sample.name for family in text_string_to_metric_families(body.decode())
                    for sample in family.samples}
        self.assertEqual(named - exported, set())
