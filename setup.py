"""Install hook: regenerate Twisted's plugin cache so `twistd transferd` is found at once."""

from setuptools import setup
from setuptools.command.develop import develop
from setuptools.command.install import install


def _refresh_plugin_cache():
    try:
        from twisted.plugin import IPlugin, getPlugins

        list(getPlugins(IPlugin))
    except Exception:  # the cache is an optimisation; twistd rebuilds it when it can
        pass


class Install(install):
    def run(self):
        super().run()
        _refresh_plugin_cache()


class Develop(develop):
    def run(self):
        super().run()
        _refresh_plugin_cache()


setup(cmdclass={"install": Install, "develop": Develop})
