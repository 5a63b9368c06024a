"""Suite-wide settings: one torch thread.

Chains of small tensor ops (conjugate-gradient iterations, LeNet passes) slow down by orders of
magnitude when OpenMP threads oversubscribe busy cores; the suite pins one intra-op thread so
its run time does not depend on what else the machine is doing. CPU results (the bit-identical
determinism and resume checks) also depend on the thread count, so it is fixed for them too.
"""

import torch

torch.set_num_threads(1)

# The cost estimate's per-machine calibration (benchmark/cost.py) goes to a folder of this test session,
# never to the user's ~/.cache/salbench: measured once per session (a few seconds), shared with the
# salbench subprocesses the tests start (they inherit the environment).
import atexit  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_CACHE = tempfile.mkdtemp(prefix="salbench-test-cache-")
os.environ["SALBENCH_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
