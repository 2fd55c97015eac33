import os
import sys

# tests import the torch oracle as a plain module
sys.path.insert(0, os.path.dirname(__file__))

# A developer's own `numbaconv tune` wisdom must not change what the tests check (auto's
# heuristic, the default plans); tests/test_tuning.py turns it on with its own files.
os.environ["NUMBACONV_WISDOM"] = "0"
