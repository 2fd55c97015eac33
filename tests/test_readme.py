"""The README's Python snippets run as written (they are the first code a user copies)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index):
    code = BLOCKS[index]
    namespace = {}
    if "grad_out" in code:  # the training snippet continues from the quick start's arrays
        import numpy as np

        import numbaconv
        namespace["numbaconv"] = numbaconv
        x = np.random.rand(1, 8, 12, 12).astype(np.float32)
        w = np.random.rand(16, 8, 3, 3).astype(np.float32)
        namespace.update(x=x, w=w, grad_out=np.ones((1, 16, 6, 6), np.float32),
                         w_t=np.random.rand(8, 4, 3, 3).astype(np.float32))
    exec(compile(code, f"README.md block {index}", "exec"), namespace)
