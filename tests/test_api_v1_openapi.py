"""The OpenAPI document (transferd/openapi_v1.json) and the v1 routes are the same API."""

import json
import re

import schemathesis
from twisted.trial import unittest

from transferd import jobs
from transferd.api_v1 import OPENAPI_PATH, APIv1

# Implied by other methods rather than documented: werkzeug answers HEAD with GET's handler.
IMPLIED = {"HEAD", "OPTIONS"}


def routes():
    """{(OpenAPI path, method)} of the v1 Klein app."""
    found = set()
    for rule in APIv1.app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        found |= {(path, method.lower()) for method in rule.methods - IMPLIED}
    return found


def load():
    with open(OPENAPI_PATH) as handle:
        return json.load(handle)


class DocumentTests(unittest.SynchronousTestCase):
    def test_document_is_valid_openapi_3_1(self):
        """The document validates against the OpenAPI 3.1 schema."""
        document = load()
        self.assertEqual(document["openapi"], "3.1.0")
        schemathesis.openapi.from_dict(document).validate()

    def test_every_route_documented_and_every_operation_served(self):
        """Every route and method of the handlers is documented, and every documented operation has a handler."""
        document = load()
        documented = {(path, method) for path, item in document["paths"].items() for method in item
                      if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace")}
        self.assertEqual(documented, routes())

    def test_refusals_documented(self):
        """Every operation that reads the job store documents 503 with Retry-After, and each its 401."""
        document = load()
        for path, item in document["paths"].items():
            for method, operation in item.items():
                if method == "parameters" or path.endswith("openapi.json"):
                    continue
                self.assertIn("401", operation["responses"], (path, method))
                if not path.endswith("whoami"):
                    self.assertIn("503", operation["responses"], (path, method))
        retry = document["components"]["responses"]["Unavailable"]["headers"]["Retry-After"]
        self.assertTrue(retry["required"])

    def test_job_view_documented(self):
        """The document's Job lists exactly the fields a v1 job view may show."""
        properties = load()["components"]["schemas"]["Job"]["properties"]
        self.assertEqual(set(properties), set(jobs.V1_VIEW))
