"""DPM-Solver++ sampling at the original Stable Diffusion v2 path `ldm.models.diffusion.dpm_solver`."""
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
