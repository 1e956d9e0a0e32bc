"""schemathesis against the real daemon (twistd) for every v1 operation, from the served OpenAPI document.

Valid and invalid requests alike: never a 500, every answer (status, media
type, body, headers) as the document says, and no refused request changes
a job, a history or a stored submission.  The daemon runs the embedded set-up
with a stager that takes an hour, so jobs park in STAGING and only requests
change them.
"""

import json
import os
import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests import test_fuzz as fuzz
from transferd.api_v1 import OPENAPI_PATH

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


class Target(fuzz.Target):
    """The fuzz tests' running transferd, its jobs parked in STAGING, with a view of histories and submissions too."""

    def __init__(self, workdir):
        # prefetch 1000: every job is taken for staging at once, and stays there (the stager takes an hour).
        super().__init__(workdir, queue={"prefetch": "1000"}, api={"max_batch": "20", "access_log": "false"})
        self.url = f"http://127.0.0.1:{self.port}"

    def settle(self, timeout=10):
        """Wait until no job waits to be taken for staging: nothing changes a job from now on but requests."""
        deadline = time.monotonic() + timeout
        while self.query("SELECT COUNT(*) FROM jobs WHERE status = 'SUBMITTED'")[0][0]:
            assert time.monotonic() < deadline, "jobs stayed SUBMITTED"
            time.sleep(0.02)

    def query(self, statement):
        self.database.rollback()  # a fresh snapshot
        return self.database.execute(statement).fetchall()

    def rows(self):
        """What a request could change: the jobs' user-visible columns, the histories and the submissions."""
        return (
            self.query("SELECT job_id, status, detailed_status, destination_path, submitter, priority, label,"
                       " metadata, stage_attempts, time_updated FROM jobs ORDER BY job_id"),
            self.query("SELECT COUNT(*), MAX(event_id) FROM job_events"),
            self.query("SELECT submission_key, results FROM submissions ORDER BY submission_key"),
        )


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    target = Target(str(tmp_path_factory.mktemp("schemathesis")))
    destination = "file://" + os.path.join(target.workdir, "deliveries")
    answer = requests.post(target.url + "/api/v1/jobs", timeout=10, json={
        "jobs": [{"product_id": product, "destination_path": destination, "label": "seed"}
                 for product in ("sample-001", "sample-002", "sample-001")]})
    assert answer.status_code == 200, answer.text
    target.settle()
    yield target
    target.stop()


with open(OPENAPI_PATH) as handle:
    SCHEMA = schemathesis.openapi.from_dict(json.load(handle))
# (path, method, mode): valid requests to every operation, invalid ones to those that take any input.
CASES = [
    (operation.path, operation.method.upper(), mode)
    for operation in (result.ok() for result in SCHEMA.get_all_operations())
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode == GenerationMode.POSITIVE or any(True for _ in operation.iter_parameters()) or operation.body
]


@pytest.mark.parametrize("path, method, mode", CASES, ids=[f"{m} {p} {g.value}" for p, m, g in CASES])
def test_every_operation(target, path, method, mode):
    """Any request to a v1 operation gets a documented answer, never a 500, and a refused one changes nothing."""

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.filter_too_much])
    @given(case=SCHEMA[path][method].as_strategy(generation_mode=mode))
    def run(case):
        target.settle()
        before = target.rows()
        response = case.call(base_url=target.url, timeout=10)
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            assert target.rows() == before, f"{case.method} {case.path} answered {response.status_code} and changed a job"

    run()
