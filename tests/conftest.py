"""Suite-wide settings: one intra-op thread per xdist worker, so two workers share two cores without
oversubscription (each worker otherwise starts as many threads as there are cores); the `main_module` fixture."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

MAIN = Path(__file__).resolve().parents[1] / "main.py"

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def main_module():
    """main.py imported as the module `main`, as configs name its classes (main.DataModuleFromConfig, main.ImageLogger)."""
    if "main" not in sys.modules:
        spec = importlib.util.spec_from_file_location("main", MAIN)
        module = importlib.util.module_from_spec(spec)
        sys.modules["main"] = module
        spec.loader.exec_module(module)
    return sys.modules["main"]
