"""Bind ``numba.cuda`` once, to the CUDA simulator unless told otherwise, before anything else
imports it.  ``numba.cuda`` picks hardware or simulator at its first import, for the whole
process: ``tests/test_cuda.py`` needs the simulator on machines without a GPU, and torch's own
testing package (``tests/test_torch_ops.py``) imports ``numba.cuda`` whenever numba is
installed.  Whichever test module pytest imports first calls :func:`bind`; ``NUMBA_ENABLE_CUDASIM``
is restored afterwards, so other modules do not see ``"cuda"`` in ``algorithms()``
(``NUMBA_ENABLE_CUDASIM=0 pytest tests/test_cuda.py`` runs on a real GPU)."""

import importlib.util
import os
import sys

HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None


def reload_numba_config():
    """Re-read NUMBA_* now.  Numba re-reads them at the next compile whenever they changed,
    which would reset config attributes other code set by hand (tiled's SLP switch)."""
    from numba.core import config

    config.reload_config()


def bind():
    """``(cuda, simulator, usable)``: the bound ``numba.cuda`` (None without numba-cuda),
    whether it is the simulator, whether its kernels can run here."""
    prior = os.environ.get("NUMBA_ENABLE_CUDASIM")
    if HAVE_NUMBA_CUDA and "numba.cuda" not in sys.modules and prior is None:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    try:
        from numbaconv.cuda import conv as cuda_conv

        if not HAVE_NUMBA_CUDA:
            return None, False, False
        cuda = cuda_conv._import_cuda()  # binds numba.cuda now: the simulator unless told otherwise
        sim = cuda_conv._sim_loaded()
        return cuda, sim, sim or cuda_conv._hardware_available()
    finally:
        if prior is None:
            os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
        reload_numba_config()
