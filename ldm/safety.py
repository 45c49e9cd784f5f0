"""What Stable Diffusion v1's txt2img did to its outputs, as options: the safety checker and the invisible watermark.

- `SafetyChecker(path)`: diffusers' `StableDiffusionSafetyChecker` and its CLIP feature extractor, both loaded with
  `from_pretrained(path)` from a local folder (CompVis/stable-diffusion-safety-checker as downloaded); flagged
  images are replaced by black ones (diffusers' replacement; SD v1 pasted a picture from its assets instead).
- `Watermarker(text)`: the `invisible-watermark` package's DWT-DCT encoder with the bytes of `text` (SD v1:
  "StableDiffusionV1", SD 2: "SDV2"), applied to uint8 RGB images as SD v1's `put_watermark` (on BGR).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ldm.errors import UserError

logger = logging.getLogger(__name__)

WATERMARK_V1 = "StableDiffusionV1"
WATERMARK_MIN_SIDE = 256  # imwatermark's dwtDct refuses smaller images


class SafetyChecker:
    """SD v1's safety check over a local `StableDiffusionSafetyChecker` folder (model + feature extractor)."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", flag: str = "--safety_checker"):
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{flag}: '{path}' is not a safety-checker folder (expected config.json and the weights "
                            "of CompVis/stable-diffusion-safety-checker, saved with save_pretrained)")
        try:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import AutoImageProcessor
        except ImportError as err:
            raise UserError(f"{flag} needs the diffusers package (pip install diffusers): {err}") from None
        try:
            self.extractor = AutoImageProcessor.from_pretrained(path)
            self.model = StableDiffusionSafetyChecker.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as err:
            raise UserError(f"{flag}: cannot load the safety checker from '{path}': {' '.join(str(err).split())}") \
                from None
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """(images with the flagged ones black, one flag per image) for images (B, 3, H, W) in [-1, 1]."""
        x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        pil = [Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in x]
        clip_input = self.extractor(pil, return_tensors="pt").pixel_values.to(self.device)
        checked, flags = self.model(images=x.copy(), clip_input=clip_input)
        checked = torch.from_numpy(np.asarray(checked, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
        flags = [bool(f) for f in flags]
        if any(flags):
            logger.warning("the safety checker flagged %d of %d image(s); they are written black", sum(flags),
                           len(flags))
        return checked.to(images.dtype), flags


class Watermarker:
    """SD v1's invisible watermark: `text`'s bytes embedded with imwatermark's dwtDct into uint8 RGB images."""

    def __init__(self, text: str = WATERMARK_V1, flag: str = "--watermark"):
        if not text:
            raise UserError(f"{flag}: the watermark text is empty")
        try:
            from imwatermark import WatermarkEncoder
        except ImportError:
            raise UserError(f"{flag} needs the invisible-watermark package (pip install invisible-watermark)") \
                from None
        self.text, self.flag = text, flag
        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bytes", text.encode("utf-8"))

    def check_size(self, height: int, width: int) -> None:
        """Images smaller than 256 x 256 cannot carry the watermark: a user error naming the flag."""
        if min(height, width) < WATERMARK_MIN_SIDE:
            raise UserError(f"{self.flag}: images of {width}x{height} are too small for the invisible watermark "
                            f"(both sides must be at least {WATERMARK_MIN_SIDE} pixels)")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The watermarked copy of one (H, W, 3) uint8 RGB image (encoded on BGR, as the original)."""
        self.check_size(*image.shape[:2])
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        return np.ascontiguousarray(self.encoder.encode(bgr, "dwtDct")[:, :, ::-1])


def read_watermark(image: np.ndarray, length: int) -> bytes:
    """The `length` bytes embedded by `Watermarker` in a (H, W, 3) uint8 RGB image (imwatermark's decoder)."""
    from imwatermark import WatermarkDecoder

    return WatermarkDecoder("bytes", 8 * length).decode(np.ascontiguousarray(image[:, :, ::-1]), "dwtDct")


def flag_metadata(flags: Sequence[bool]) -> list[dict[str, str]]:
    """One PNG text entry per image saying whether the safety checker replaced it."""
    return [{"nsfw_replaced": str(bool(f))} for f in flags]
