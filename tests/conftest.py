"""Suite-wide settings: one intra-op thread per xdist worker, so two workers share two cores without
oversubscription (each worker otherwise starts as many threads as there are cores)."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
