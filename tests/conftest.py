import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _scratch_directory(tmp_path_factory):
    """Run in a scratch directory: trial's mktemp() writes relative to the working directory."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("run"))
    yield
    os.chdir(previous)
