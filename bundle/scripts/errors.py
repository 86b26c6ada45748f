"""One clear last line for the bundle's own errors on the command line.

``python -m monai.bundle run`` lets an exception raised inside a config expression escape wrapped in MONAI's
``RuntimeError: Failed to evaluate ConfigExpression`` (or ``Failed to instantiate component``), so the message the
bundle wrote (which file, which option, what to do) sits some 25 lines up a 70-line traceback. ``setup_logging``
(the configs' ``logging`` expression) installs ``sys.excepthook`` handling: when the cause is an error the bundle
raised on purpose, the output ends with that message as one line and the traceback is shown only at
``--log_level DEBUG`` (or with ``MEDSMILE_TRACEBACK=1``); any other exception (a bug) keeps Python's full
traceback. The exit status stays 1.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
# what the bundle raises on purpose: bad input or option (ValueError), refused resume (RuntimeError), file errors
OWN_ERRORS = (ValueError, RuntimeError, OSError)


def bundle_error(exc: BaseException) -> BaseException | None:
    """The outermost exception of ``exc``'s chain that the bundle's own code (scripts/) raised on purpose (its last
    frame is in scripts/), or None: past MONAI's wrappers, before whatever library error it explains."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = traceback.extract_tb(exc.__traceback__)
        if (
            isinstance(exc, OWN_ERRORS)
            and frames
            and os.path.dirname(os.path.abspath(frames[-1].filename)) == SCRIPTS_DIR
        ):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


TRACEBACK_ENV = "MEDSMILE_TRACEBACK"  # set to 1: the traceback too, in configs without a log_level (inference.json)
_hint = f"{TRACEBACK_ENV}=1"


def _hook(exc_type, exc, tb, _previous=sys.excepthook) -> None:
    own = bundle_error(exc) if isinstance(exc, BaseException) else None
    if own is None:
        _previous(exc_type, exc, tb)
        return
    debug = logging.getLogger().isEnabledFor(logging.DEBUG) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    if debug:
        _previous(exc_type, exc, tb)
    hint = "" if debug else f" [{_hint} shows the traceback]"
    sys.stderr.write(f"ERROR: {one_line(own)}{hint}\n")
    sys.stderr.flush()


def install_hook(hint: str = f"{TRACEBACK_ENV}=1") -> None:
    """Route uncaught exceptions through ``_hook`` (idempotent); ``hint`` says how to see the traceback."""
    global _hint
    _hint = hint
    if sys.excepthook is not _hook:
        sys.excepthook = _hook


def setup_logging(level: str = "INFO") -> None:
    """The configs' logging set-up: the log format, and one clear last line for the bundle's own errors."""
    logging.basicConfig(
        level=getattr(logging, str(level).upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_hook("--log_level DEBUG")
