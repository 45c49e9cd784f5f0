"""Reference implementations for the sampling tests: k-diffusion (test-only) and diffusers.

`import k_diffusion` runs its package __init__, which imports its training / evaluation helpers and through them
`clip`, which needs `pkg_resources` (gone from setuptools >= 81). The tests only need k-diffusion's pure modules
(sampling, external, layers), so the `kd` fixture loads those from the installed package without its __init__.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


@pytest.fixture(scope="session")
def kd() -> types.SimpleNamespace:
    """k-diffusion's `sampling`, `external` and `layers` modules (the test fails when it is not installed)."""
    try:
        import k_diffusion  # noqa: F401  (works where its dependencies import cleanly)
    except ImportError:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            pytest.fail("k-diffusion (the test-only reference) is not installed: `make install` installs it")
        for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
            del sys.modules[name]
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["k_diffusion"] = package
    modules = {name: importlib.import_module(f"k_diffusion.{name}") for name in ("sampling", "external", "layers")}
    return types.SimpleNamespace(**modules)
