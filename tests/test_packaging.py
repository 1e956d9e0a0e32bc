"""Packaging: the twistd plugins reach twistd after a normal install, and after an editable one plus lib.sh."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGINS = ("transferd", "transferd-stager", "transferd-fakefts")
SKIPPED = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "_trial_temp*",
                                 "transferd-data", "dropin.cache", "tests.*")


def run(*command, **options):
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True, **options)


class PackagingTests(unittest.TestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.tree = os.path.join(self.base, "tree")
        shutil.copytree(ROOT, self.tree, ignore=SKIPPED)

    def test_wheel_carries_the_plugins(self):
        """When transferd is built as a wheel, it holds the three plugin files, but no twisted/__init__.py."""
        out = os.path.join(self.base, "wheels")
        run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, self.tree)
        (wheel,) = os.listdir(out)
        names = set(zipfile.ZipFile(os.path.join(out, wheel)).namelist())
        for plugin in ("transferd_plugin.py", "transferd_stager_plugin.py", "transferd_fakefts_plugin.py"):
            self.assertIn("twisted/plugins/" + plugin, names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("transferd/auth/voms.py", names)
        for asset in ("templates/page.html", "static/dashboard.css", "static/dashboard.js"):
            self.assertIn("transferd/dashboard/" + asset, names)

    def test_editable_install_with_plugin_path(self):
        """When transferd is installed editable, twistd lists its plugins once lib.sh's plugin_path has run."""
        venv = os.path.join(self.base, "venv")
        run(sys.executable, "-m", "venv", "--without-pip", venv)
        python = os.path.join(venv, "bin", "python")
        site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
        with open(os.path.join(site, "dependencies.pth"), "w") as handle:
            handle.write(sysconfig.get_paths()["purelib"] + "\n")  # Twisted and the rest, from the test's venv
        run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-build-isolation",
            "-e", self.tree)

        def listed():
            shown = run(python, "-m", "twisted", "--help", cwd=self.base).stdout
            return {name for name in PLUGINS if f"    {name} " in shown}

        self.assertEqual(listed(), set(), "an editable install alone maps the transferd package only")
        run("bash", "-c", 'source "$1/scripts/lib.sh" && plugin_path "$2"', "lib", self.tree, venv)
        self.assertEqual(listed(), set(PLUGINS))
