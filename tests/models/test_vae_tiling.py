"""AutoencoderKL's sliced and tiled decodes: slicing is exact; tiles cover the image, blend without visible seams
(close to the whole decode) and decode the pieces one at a time."""
import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import _tile_starts, tiled_decode

DD = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope="module")
def autoencoder():
    torch.manual_seed(0)
    return AutoencoderKL(ddconfig=DD, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    span = (b.max() - b.min()).item()
    return 10 * torch.log10(span**2 / (a - b).square().mean()).item()


def test_slicing_is_exact(autoencoder):
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        whole = autoencoder.decode(z)
        autoencoder.enable_slicing()
        sliced = autoencoder.decode(z)
        autoencoder.disable_slicing()
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)


def test_tiles_cover_the_latent():
    assert _tile_starts(8, 8, 6) == [0]
    assert _tile_starts(20, 8, 6) == [0, 6, 12]
    assert _tile_starts(21, 8, 6) == [0, 6, 12, 13]


def test_tiled_decode_blends_close_to_the_whole_decode(autoencoder):
    torch.manual_seed(1)
    z = torch.randn(1, 4, 24, 24)
    seen = []

    def decode(part):
        seen.append(tuple(part.shape[-2:]))
        return autoencoder.decoder(autoencoder.post_quant_conv(part))

    with torch.no_grad():
        whole = autoencoder.decode(z)
        tiled = tiled_decode(decode, z, tile=12, overlap=4)
        autoencoder.enable_tiling(12, overlap=4)
        via_model = autoencoder.decode(z)
        autoencoder.disable_tiling()
    assert set(seen) == {(12, 12)} and len(seen) == 9  # every piece is one tile: memory bounded by the tile
    assert tiled.shape == whole.shape
    torch.testing.assert_close(via_model, tiled)
    # untrained decoder on noise latents (27 dB here); per-tile GroupNorm statistics are the only difference
    assert psnr(tiled, whole) > 20
    no_blend = tiled_decode(decode, z, tile=12, overlap=0)
    assert psnr(tiled, whole) > psnr(no_blend, whole)  # the overlap blend hides seams


def test_bad_overlap_is_refused(autoencoder):
    with pytest.raises(ValueError, match="overlap"):
        autoencoder.enable_tiling(8, overlap=8)
