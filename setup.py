"""The metadata is in setup.cfg.

twisted/plugins (no __init__.py) is installed as part of the twisted.plugins
package, so a normal install puts the plugins where twistd looks.  An
editable install maps the transferd package only: scripts/lib.sh's
plugin_path then shows the checkout's twisted/plugins to the venv's twistd.
"""

from setuptools import setup

setup()
