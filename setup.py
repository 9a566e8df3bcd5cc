"""Only the package list lives here: setup.cfg's ``packages = find:`` searches a single directory, and the
product has two roots (the core under ryu_apps/, the host side, topologies and the client at the top).
Everything else is in setup.cfg."""

from setuptools import find_packages, setup

setup(packages=find_packages("ryu_apps")
      + find_packages(".", include=["hostside", "hostside.*", "topologies", "violin_client", "violin_client.*"]))
