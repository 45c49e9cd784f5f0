"""SamplingSpec, how scripts/evaluate.py and EvaluationCallback draw samples: every name of the sampler registry and
its aliases, and the eta rule of txt2img.py (0 for ddim, the sampler's own for the others unless given)."""
import pytest

from ldm import inference as inf
from ldm.evaluation.common import EvaluationError
from ldm.evaluation.generation import SamplingSpec


def test_the_spec_takes_every_registered_sampler_and_the_scripts_eta_rule():
    for name in (*inf.SAMPLERS, "dpm"):
        SamplingSpec(name).check_name()
    assert SamplingSpec().eta == 0.0 and SamplingSpec("ddim", eta=0.5).eta == 0.5
    assert SamplingSpec("euler_ancestral").eta is None  # its own eta 1, not a deterministic 0
    assert SamplingSpec("euler_ancestral", eta=0.3).eta == 0.3
    with pytest.raises(EvaluationError, match="--sampler: unknown sampler 'nope'"):
        SamplingSpec("nope").check_name()
