"""use_positional_encodings never worked in the original (LatentDiffusion.get_input called an undefined
compute_latent_shifts): it is refused with one error naming the config key, for DDPM and LatentDiffusion alike."""
import pytest

from ldm.util import ConfigError, instantiate_from_config
from tiny_ldm import model_config
from tiny_ldm import unet as tiny_unet


@pytest.mark.parametrize("target", ["DDPM", "LatentDiffusion"])
def test_use_positional_encodings_is_refused_by_name(target):
    cfg = model_config(f"ldm.models.diffusion.ddpm.{target}", tiny_unet(4, context_dim=None), "__is_unconditional__",
                       None, use_positional_encodings=True)
    if target == "DDPM":
        for key in ("first_stage_config", "cond_stage_config", "cond_stage_key", "scale_factor"):
            del cfg.params[key]
    with pytest.raises(ConfigError, match="model.params.use_positional_encodings: true is not supported"):
        instantiate_from_config(cfg)
    cfg.params.use_positional_encodings = False
    assert type(instantiate_from_config(cfg)).__name__ == target
