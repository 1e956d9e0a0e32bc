"""twistd, whose local stager kills the whole process (os._exit) whenever it stages the product "crash-me",
and whose store kills it just after committing a v1 batch whose submission_id starts with "crash-after-commit".

tests/test_faults.py runs transferd through it: a message whose work crashes
the daemon on every delivery, as a bug or a poisonous product would.
tests/test_api_v1_daemon.py: a daemon that dies between committing a batch and answering it.
Run as: python tests/crashing_twistd.py TWISTD-ARGUMENTS...
"""

import os
import sys

from twisted.scripts.twistd import run

from transferd.stagers import local
from transferd.store.sql import SQLJobStore

CRASH_PRODUCT = "crash-me"
CRASH_SUBMISSION = "crash-after-commit"
CRASH_STATUS = 70

_stage_now = local.LocalStager._stage_now
_create_many = SQLJobStore.create_many


def _create_many_or_crash(self, new_jobs, *args, submission=None, **kwargs):
    created = _create_many(self, new_jobs, *args, submission=submission, **kwargs)
    if submission is not None and submission.submission_id.startswith(CRASH_SUBMISSION):
        created.addCallback(lambda _: os._exit(CRASH_STATUS))  # committed; the answer is never sent
    return created


def _stage_or_crash(self, job):
    if job.product_id == CRASH_PRODUCT:
        os._exit(CRASH_STATUS)
    return _stage_now(self, job)


if __name__ == "__main__":
    local.LocalStager._stage_now = _stage_or_crash
    SQLJobStore.create_many = _create_many_or_crash
    sys.argv[0] = "twistd"
    run()
