"""``monailabel`` command line with ``torchvision_shim`` installed first (see that file): run it with the MONAI
Label venv's python, e.g. ``python serve.py start_server --app ... --studies ... --conf models medsmile``."""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchvision_shim

reason = torchvision_shim.install()
if reason:
    print(f"torchvision stand-in installed ({reason})", file=sys.stderr)
sys.path.pop(0)
runpy.run_module("monailabel.main", run_name="__main__", alter_sys=True)
