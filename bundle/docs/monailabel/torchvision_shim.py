"""Let MONAI Label import in a virtual environment whose torch is the CPU-only build.

PyPI's torchvision wheels are CUDA builds: their C++ ops need ``libtorch_cuda.so``, so with ``torch==2.13.0+cpu``
``import torchvision`` fails (``RuntimeError: operator torchvision::nms does not exist``), and no CPU torchvision
wheel is on PyPI. MONAI Label imports ``torchvision.utils`` (``make_grid``, ``save_image``) at module level in
``monailabel/transform/post.py`` but its inference path (``BundleInferTask``) never calls them.

The broken wheel also breaks ``transformers`` (it sees torchvision installed, imports it, and then
``Mask2FormerForUniversalSegmentation`` fails to import), so the CPU venv must not keep it: ``install_venv.sh``
uninstalls it. ``install()`` tries the real torchvision first and changes nothing when it imports. Otherwise it
puts a stand-in ``torchvision`` (``utils.make_grid`` / ``utils.save_image`` that raise when called) in
``sys.modules`` only while it imports the two MONAI Label modules that import torchvision at module level, then
removes it again, so that every other library (``transformers`` above all) still sees no torchvision; as those
imports import ``transformers.utils.import_utils``, whose ``is_torchvision_available()`` is cached on first call, it
asks that question first, while the answer is still the true one (False). It returns why the real one failed.
With the CUDA torch from PyPI (and its matching torchvision) it is never needed.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

# the MONAI Label modules that import torchvision at module level (monailabel 0.8.5)
MONAILABEL_MODULES = ("monailabel.transform.post", "monailabel.deepedit.handlers")


def install() -> str | None:
    """None when the real torchvision imports; otherwise import MONAILABEL_MODULES against the stand-in and return
    the real one's import error."""
    try:
        import torchvision  # noqa: F401

        return None
    except Exception as err:  # noqa: BLE001 - a CUDA-only wheel raises RuntimeError, a missing one ImportError
        reason = f"{type(err).__name__}: {err}"

    def forget_torchvision():
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision is a stand-in here: the real one failed to import ({reason})")

    forget_torchvision()
    try:  # cache transformers' true answer before the stand-in could change it
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
    except ImportError:
        pass
    package = types.ModuleType("torchvision")
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    package.__path__ = []
    utils = types.ModuleType("torchvision.utils")
    utils.make_grid = utils.save_image = unavailable
    package.utils = utils
    sys.modules["torchvision"] = package
    sys.modules["torchvision.utils"] = utils
    try:
        for module in MONAILABEL_MODULES:
            importlib.import_module(module)
    finally:
        forget_torchvision()
    return reason
