import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)  # lab/ and workloads/ are not installed: the tests import them from the tree
sys.path.insert(0, os.path.join(ROOT, "ryu_apps"))

from violin_core.fabric import Fabric  # noqa: E402

Fabric.check_partial = True  # every reconcile of some hosts is checked against deriving all flows
