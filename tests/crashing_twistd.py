"""twistd, whose local stager kills the whole process (os._exit) whenever it stages the product "crash-me".

tests/test_faults.py runs transferd through it: a message whose work crashes
the daemon on every delivery, as a bug or a poisonous product would.
Run as: python tests/crashing_twistd.py TWISTD-ARGUMENTS...
"""

import os
import sys

from twisted.scripts.twistd import run

from transferd.stagers import local

CRASH_PRODUCT = "crash-me"
CRASH_STATUS = 70

_stage_now = local.LocalStager._stage_now


def _stage_or_crash(self, job):
    if job.product_id == CRASH_PRODUCT:
        os._exit(CRASH_STATUS)
    return _stage_now(self, job)


if __name__ == "__main__":
    local.LocalStager._stage_now = _stage_or_crash
    sys.argv[0] = "twistd"
    run()
