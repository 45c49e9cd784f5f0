"""Scores of the shapes demo: caption adherence judged from pixels, and PSNR."""
import math

import numpy as np
import pytest
import torch

from ldm.data.shapes import COLORS, SHAPES, ShapesValidation, caption_of
from ldm.evaluation.shapes import autoencoder_psnr, autoencoder_scores, caption_adherence, parse_caption, psnr


def test_parse_caption_round_trips_and_rejects_other_text():
    assert parse_caption(caption_of("triangle", "cyan", "gray")) == ("triangle", "cyan", "gray")
    with pytest.raises(ValueError, match="is not of the form"):
        parse_caption("a pink hexagon on a white background")


def test_adherence_is_full_on_ground_truth_and_none_on_mismatched_captions():
    data = ShapesValidation(size=32, length=42)
    examples = [data[i] for i in range(len(data))]
    images = [e["image"] for e in examples]
    right = caption_adherence(images, [e["caption"] for e in examples])
    assert right.overall == 1.0 and right.total == 42
    assert set(right.shape_rates().values()) == {1.0}
    # a caption with both the next shape and the next colour: no image can match it
    colors = list(COLORS)
    wrong = [caption_of(SHAPES[(SHAPES.index(e["shape"]) + 1) % 3], colors[(colors.index(e["color"]) + 1) % 7],
                        e["background"]) for e in examples]
    score = caption_adherence(images, wrong)
    assert score.overall == 0.0 and score.hits == 0
    assert all(rate == 0.0 for rate in score.color_rates().values())
    assert "caption adherence: 0.0% (0/42)" in score.report()


def test_adherence_counts_per_shape_and_colour():
    data = ShapesValidation(size=32, length=6)
    examples = [data[i] for i in range(6)]
    captions = [e["caption"] for e in examples]
    captions[0] = caption_of(examples[0]["shape"], "red" if examples[0]["color"] != "red" else "blue",
                             examples[0]["background"])  # one wrong colour
    score = caption_adherence([e["image"] for e in examples], captions)
    assert (score.hits, score.total) == (5, 6)
    asked = parse_caption(captions[0])
    assert score.per_shape[asked[0]][0] == score.per_shape[asked[0]][1] - 1
    assert score.per_color[asked[1]][0] == score.per_color[asked[1]][1] - 1
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        caption_adherence([examples[0]["image"]] * 2, captions[:1])


def test_psnr_against_a_hand_computation():
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    y = x.clone()
    y[0, 0, 0, 0] += 0.5  # one of 48 values off by 0.5 in a range of 2
    expected = 10 * math.log10(2.0**2 / (0.25 / 48))
    values = psnr(y, x)
    assert values[0].item() == pytest.approx(expected, rel=1e-9)
    assert torch.isinf(values[1])
    # in uint8 range the same images give the same value
    assert psnr((y[:1] + 1) * 127.5, (x[:1] + 1) * 127.5, data_range=255.0).item() == pytest.approx(expected)


class _NoisyIdentity(torch.nn.Module):
    """An 'autoencoder' whose reconstruction is the input plus a fixed offset."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return x

    def decode(self, z):
        return z + self.offset


def test_autoencoder_psnr_of_a_known_error():
    data = ShapesValidation(size=16, length=5)
    # clamping to [-1, 1] keeps white pixels at 1: compute the expected value the same way
    x = torch.stack([torch.as_tensor(data[i]["image"]) for i in range(5)]).permute(0, 3, 1, 2)
    mse = ((x + 0.1).clamp(-1, 1) - x).pow(2).flatten(1).mean(1).double()
    expected = (10 * torch.log10(4.0 / mse)).mean().item()
    assert autoencoder_psnr(_NoisyIdentity(0.1), data, n=5, batch_size=2) == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(expected)


def test_autoencoder_scores_give_the_psnr_and_judge_the_reconstructions():
    data = ShapesValidation(size=16, length=6)
    score_psnr, exact = autoencoder_scores(_NoisyIdentity(0.0), data, n=6, batch_size=4)
    assert score_psnr > 40 and exact.total == 6 and exact.overall == 1.0  # real shapes, reconstructed exactly
    noisy_psnr, _ = autoencoder_scores(_NoisyIdentity(0.1), data, n=6, batch_size=4)
    assert noisy_psnr == pytest.approx(autoencoder_psnr(_NoisyIdentity(0.1), data, n=6, batch_size=4))
    _, blank = autoencoder_scores(_NoisyIdentity(-5.0), data, n=6, batch_size=4)  # everything decodes to black
    assert blank.overall == 0.0
