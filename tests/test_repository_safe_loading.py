"""Nothing the bundle loads can execute code: every torch.load passes weights_only=True, no pickle.load or eval on
data, and MONAI's CheckpointLoader (used to resume) loads with weights_only=True too."""

import inspect
import pathlib
import re

from monai.handlers import CheckpointLoader

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("bundle/scripts", "bundle/deploy", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def test_every_torch_load_is_weights_only():
    assert SOURCES
    for path in SOURCES:
        for call in re.findall(r"torch\.load\((.*)", path.read_text()):
            assert "weights_only=True" in call, f"{path.name}: torch.load without weights_only=True: {call}"


def test_no_pickle_load_or_eval_on_data():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"pickle\.loads?\(", text), path.name
        assert not re.search(r"(?<![\w.])eval\(", text), path.name


def test_monai_checkpoint_loader_is_weights_only():
    assert "weights_only=True" in inspect.getsource(CheckpointLoader.__call__)
