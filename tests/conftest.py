import os
import sys

# tests import the torch oracle as a plain module
sys.path.insert(0, os.path.dirname(__file__))

# A developer's own `numbaconv tune` wisdom must not change what the tests check (auto's
# heuristic, the default plans); tests/test_tuning.py turns it on with its own files.
os.environ["NUMBACONV_WISDOM"] = "0"


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_tiled_decisions():
    """tiled caches its per-problem decisions (numbaconv.cpu.tiled._layer); tests that patch the
    planner or a threshold (dot's, streaming's) must not meet an earlier test's decision."""
    from numbaconv.cpu import pointwise, tiled
    tiled._layer.cache_clear()
    pointwise._layer.cache_clear()
    yield
    tiled._layer.cache_clear()
    pointwise._layer.cache_clear()
