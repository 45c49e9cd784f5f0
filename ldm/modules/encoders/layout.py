"""Bounding-box layouts as token sequences, read back and drawn: the `coordinates_bbox` conditioning of latent-diffusion's
layout-to-image model (`models/ldm/layout2img-openimages256`), in the format of taming-transformers' object
conditional builders.

A sequence holds `no_max_objects` triples (object representation, top-left token, bottom-right token), padded with
the 'none' token `no_tokens - 1`, then (with `encode_crop`) the crop's two corner tokens. A point (x, y) in
[0, 1]^2 is the token y_i * s + x_i on an s x s grid, s = floor(sqrt(no_tokens)) (90 for 8192 tokens), x_i and y_i
rounded to the grid. An object's representation is category_no + no_object_classes * flags (1 group-of,
2 occluded, 4 depiction, 8 inside). `build` writes such sequences (the layouts of `ldm.data.shapes.ShapesScenes`),
`inverse_build` reads them back and `plot` draws them, for `Layout2ImgDiffusion.log_images`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import cycle

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# seaborn's tab10, as taming's plots
COLOR_PALETTE = [(30, 118, 179), (255, 126, 13), (43, 159, 43), (213, 38, 39), (147, 102, 188), (139, 85, 74),
                 (226, 118, 193), (126, 126, 126), (187, 188, 33), (22, 189, 206)]
CROP_COLOR = (63, 63, 63)
FLAGS = ("group", "occluded", "depiction", "inside")

BoundingBox = tuple[float, float, float, float]  # x0, y0, w, h relative to the image


@dataclass(frozen=True)
class LayoutObject:
    """One object of a layout: its class number and Open Images flags."""

    category_no: int
    is_group_of: bool = False
    is_occluded: bool = False
    is_depiction: bool = False
    is_inside: bool = False

    def flags_string(self) -> str:
        """'(g,o)'-style initials of the set flags, '' when none is."""
        initials = [name[0] for name, on in zip(FLAGS, (self.is_group_of, self.is_occluded, self.is_depiction,
                                                         self.is_inside)) if on]
        return f"({','.join(initials)})" if initials else ""


class BoundingBoxLayout:
    """Reads and draws `coordinates_bbox` token sequences (see the module docstring; the reading side of taming's
    ObjectsBoundingBoxConditionalBuilder); `category_names[i]` labels class i in plots (else its number)."""

    def __init__(self, no_object_classes: int, no_max_objects: int = 30, no_tokens: int = 8192,
                 encode_crop: bool = True, use_group_parameter: bool = True, use_additional_parameters: bool = True,
                 category_names: Sequence[str] | None = None):
        if no_object_classes < 1 or no_max_objects < 1 or no_tokens < 4:
            raise ValueError("BoundingBoxLayout: no_object_classes, no_max_objects must be >= 1 "
                             f"and no_tokens >= 4; got {no_object_classes}, {no_max_objects}, {no_tokens}")
        self.no_object_classes, self.no_max_objects, self.no_tokens = no_object_classes, no_max_objects, no_tokens
        self.encode_crop = encode_crop
        self.use_group_parameter, self.use_additional_parameters = use_group_parameter, use_additional_parameters
        self.no_sections = int(math.sqrt(no_tokens))
        self.category_names = list(category_names) if category_names is not None else None

    @property
    def none(self) -> int:
        """The padding token."""
        return self.no_tokens - 1

    @property
    def embedding_dim(self) -> int:
        """The sequence length: 3 tokens per object, 2 for the crop."""
        return 3 * self.no_max_objects + (2 if self.encode_crop else 0)

    def coordinates_from_token(self, token: int) -> tuple[float, float]:
        """The grid point (x, y) in [0, 1]^2 of a coordinate token."""
        x, y = token % self.no_sections, token // self.no_sections
        return x / (self.no_sections - 1), y / (self.no_sections - 1)

    def bbox_from_token_pair(self, token1: int, token2: int) -> BoundingBox:
        """(x0, y0, w, h) of the box between a top-left and a bottom-right token."""
        (x0, y0), (x1, y1) = self.coordinates_from_token(token1), self.coordinates_from_token(token2)
        return x0, y0, x1 - x0, y1 - y0

    def representation_to_annotation(self, representation: int) -> LayoutObject:
        """The class number and flags an object representation encodes."""
        modifier = representation // self.no_object_classes
        extra = self.use_additional_parameters
        return LayoutObject(representation % self.no_object_classes,
                            is_group_of=bool(modifier & 1) and self.use_group_parameter,
                            is_occluded=bool(modifier & 2) and extra, is_depiction=bool(modifier & 4) and extra,
                            is_inside=bool(modifier & 8) and extra)

    def token_from_coordinates(self, x: float, y: float) -> int:
        """The coordinate token of a point (x, y) in [0, 1]^2: the nearest grid point, row-major."""
        last = self.no_sections - 1
        x_i, y_i = (min(max(int(round(v * last)), 0), last) for v in (x, y))
        return y_i * self.no_sections + x_i

    def annotation_to_representation(self, obj: LayoutObject) -> int:
        """An object's token: its class number plus no_object_classes times its flags (1 g, 2 o, 4 d, 8 i)."""
        if not 0 <= obj.category_no < self.no_object_classes:
            raise ValueError(f"category_no {obj.category_no} outside [0, {self.no_object_classes})")
        modifier = int(obj.is_group_of and self.use_group_parameter)
        if self.use_additional_parameters:
            modifier |= 2 * obj.is_occluded | 4 * obj.is_depiction | 8 * obj.is_inside
        representation = obj.category_no + self.no_object_classes * modifier
        if representation >= self.none:
            raise ValueError(f"object token {representation} collides with the 'none' token {self.none}; "
                             "no_tokens is too small for these classes and flags")
        return representation

    def build(self, objects: Sequence[tuple[LayoutObject | int, BoundingBox]],
              crop: BoundingBox = (0.0, 0.0, 1.0, 1.0)) -> torch.Tensor:
        """The token sequence (long [embedding_dim]) of objects [(object or class number, (x0, y0, w, h)), ...]
        in [0, 1] image coordinates: a triple per object in the given order, 'none' padding, the crop corners (the
        writing side of taming's ObjectsBoundingBoxConditionalBuilder, without its cropping and shuffling)."""
        if len(objects) > self.no_max_objects:
            raise ValueError(f"{len(objects)} objects; this builder holds at most {self.no_max_objects}")
        tokens: list[int] = []
        for obj, (x0, y0, w, h) in objects:
            obj = obj if isinstance(obj, LayoutObject) else LayoutObject(int(obj))
            tokens += [self.annotation_to_representation(obj), self.token_from_coordinates(x0, y0),
                       self.token_from_coordinates(x0 + w, y0 + h)]
        tokens += [self.none] * (3 * (self.no_max_objects - len(objects)))
        if self.encode_crop:
            tokens += [self.token_from_coordinates(crop[0], crop[1]),
                       self.token_from_coordinates(crop[0] + crop[2], crop[1] + crop[3])]
        return torch.tensor(tokens, dtype=torch.long)

    def inverse_build(self, conditional: torch.Tensor | Sequence[int]
                      ) -> tuple[list[tuple[LayoutObject, BoundingBox]], BoundingBox | None]:
        """([(object, box), ...] without the padding, the crop box or None) of a token sequence."""
        tokens = [int(t) for t in (conditional.tolist() if isinstance(conditional, torch.Tensor) else conditional)]
        if len(tokens) != self.embedding_dim:
            raise ValueError(f"a coordinates_bbox sequence of {len(tokens)} tokens; this builder reads "
                             f"{self.embedding_dim} ({self.no_max_objects} objects x 3"
                             f"{' + 2 crop' if self.encode_crop else ''})")
        if any(not 0 <= t < self.no_tokens for t in tokens):
            raise ValueError(f"coordinates_bbox tokens must lie in [0, {self.no_tokens}), got {min(tokens)}..{max(tokens)}")
        crop = None
        if self.encode_crop:
            crop, tokens = self.bbox_from_token_pair(tokens[-2], tokens[-1]), tokens[:-2]
        objects = [(self.representation_to_annotation(tokens[i]), self.bbox_from_token_pair(tokens[i + 1], tokens[i + 2]))
                   for i in range(0, len(tokens), 3) if tokens[i] != self.none]
        return objects, crop

    def label(self, category_no: int) -> str:
        """A class's name for plots: `category_names[category_no]`, else the number."""
        if self.category_names is not None and category_no < len(self.category_names):
            return self.category_names[category_no]
        return f"#{category_no}"

    def plot(self, conditional: torch.Tensor | Sequence[int], label_for_category_no: Callable[[int], str] | None = None,
             figure_size: tuple[int, int] = (256, 256), line_width: int = 3, font_size: int | None = None
             ) -> torch.Tensor:
        """The layout drawn on white (a coloured rectangle and label per object, the crop in gray) as an image
        [3, H, W] in [-1, 1]; figure_size is (width, height)."""
        label_for = label_for_category_no or self.label
        canvas = Image.new("RGB", tuple(figure_size), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=font_size or plot_font_size(figure_size))
        width, height = canvas.size
        objects, crop = self.inverse_build(conditional)
        for (obj, bbox), color in zip(objects, cycle(COLOR_PALETTE)):
            box = absolute_bbox(bbox, width, height)
            draw.rectangle(box, outline=color, width=line_width)
            text = f"{label_for(obj.category_no)} {obj.flags_string()}".strip()
            draw.text((box[0] + line_width, box[1] + line_width), text, fill=(0, 0, 0), font=font)
        if crop is not None:
            draw.rectangle(absolute_bbox(crop, width, height), outline=CROP_COLOR, width=line_width)
        return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def absolute_bbox(bbox: BoundingBox, width: int, height: int) -> tuple[int, int, int, int]:
    """A relative (x0, y0, w, h) box as pixel corners (left, top, right, bottom)."""
    xs = sorted((int(bbox[0] * width), int((bbox[0] + bbox[2]) * width)))
    ys = sorted((int(bbox[1] * height), int((bbox[1] + bbox[3]) * height)))
    return xs[0], ys[0], xs[1], ys[1]


def plot_font_size(figure_size: tuple[int, int]) -> int:
    """taming's label sizes: 10 px, 12 from 256 px figures, 15 from 512."""
    side = max(figure_size)
    return 15 if side >= 512 else 12 if side >= 256 else 10
