"""Suite-wide settings: one torch thread.

Chains of small tensor ops (conjugate-gradient iterations, LeNet passes) slow down by orders of
magnitude when OpenMP threads oversubscribe busy cores; the suite pins one intra-op thread so
its run time does not depend on what else the machine is doing. CPU results (the bit-identical
determinism and resume checks) also depend on the thread count, so it is fixed for them too.
"""

import torch

torch.set_num_threads(1)
