"""Every spike in throwaway/ still runs and still finds what it claims."""

import glob
import os
import subprocess
import sys

import pytest

SPIKES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "throwaway", "*.py")))


def test_there_are_spikes():
    """throwaway/ holds at least one spike (a wrong path would otherwise pass silently)."""
    assert SPIKES


@pytest.mark.parametrize("spike", SPIKES, ids=os.path.basename)
def test_spike_runs(spike):
    """The spike exits 0 within a minute."""
    result = subprocess.run([sys.executable, spike], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
