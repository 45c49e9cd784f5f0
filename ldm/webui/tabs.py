"""The web UI's tasks: one `Tab` entry each (name, label, which models it serves, how its page is built), in TABS.
Each tab reads its inputs, makes the `ldm.pipelines` task the matching script makes from the same settings (the
field labels name the script flags, and so do the messages) and returns its results to `WebUI.run`.

A new task is one more entry: a pipeline with `supports(model)` and a builder here (depth-to-image, image
variations and layout / label map to image are such entries).
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gradio as gr
from PIL import Image, ImageChops, UnidentifiedImageError

from ldm import inference as inf
from ldm.pipelines import (
    Depth2Img,
    ImageVariations,
    Img2Img,
    Inpaint,
    MapToImage,
    Progress,
    Samples,
    SuperRes,
    Txt2Img,
    inpaint_input,
)
from ldm.sampling.schedule import SPACINGS

if TYPE_CHECKING:
    from ldm.webui.app import WebUI
    from ldm.webui.models import Loaded

DEFAULT_SPACING = "default"  # the schedule choice that leaves the sampler its own spacing (no --schedule)
CONCURRENCY_ID = "model"  # every event that touches the model: one at a time, the others wait in gradio's queue
MAX_BATCH = 8


@dataclass
class TabParts:
    """What a tab's builder returns: the components whose value follows the loaded model (value of a model)."""

    defaults: dict[gr.components.Component, Callable[[Any], Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Tab:
    """One task of the UI: its API name (and results folder), tab label, the models it serves, its builder."""

    name: str
    label: str
    supports: Callable[[Any], bool]
    build: Callable[[WebUI, Tab, gr.State, gr.Gallery], TabParts]


# ----------------------------------------------------------------------------------------- shared parts
@dataclass
class Outputs:
    """A tab's buttons and result column."""

    generate: gr.Button
    cancel: gr.Button
    gallery: gr.Gallery
    status: gr.Markdown
    info: gr.JSON


def guard_upload(component: gr.components.Component, flag: str) -> gr.components.Component:
    """An upload that is no readable image becomes the scripts' one-line message naming `flag` (gradio would show
    a processing error): the component's preprocessing is wrapped on this instance."""
    preprocess = component.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            path = getattr(getattr(payload, "background", payload), "path", None)
            try:
                inf.read_image(path or "", flag)  # the scripts' message for this file
            except inf.USER_ERRORS as user_error:
                raise gr.Error(" ".join(str(user_error).split()), print_exception=False) from None
            raise err

    component.preprocess = checked
    return component


def image_input(label: str, flag: str, name: str) -> gr.Image:
    """An image upload handed over as the uploaded file itself (checked when it arrives)."""
    image = guard_upload(gr.Image(label=f"{label} ({flag})", type="filepath", image_mode=None,
                                  sources=["upload", "clipboard"], elem_id=name), flag)

    def check(path: str | None) -> None:
        if path:
            read(path, flag)

    image.upload(check, image, None, queue=False, api_visibility="private")
    return image


def read(path: str | None, flag: str, mode: str = "RGB") -> Image.Image:
    """An uploaded image read as the scripts read theirs; a missing or bad one is a message naming `flag`."""
    try:
        if not path:
            raise inf.ScriptError(f"{flag}: no image given; upload one")
        return inf.read_image(path, flag, mode=mode)
    except inf.USER_ERRORS as err:
        raise gr.Error(" ".join(str(err).split()), print_exception=False) from None


def settings(ui: WebUI, steps: float, scale: float, eta: float, negative: str) -> dict[str, Any]:
    """The settings every pipeline task takes, from the page's values."""
    return dict(steps=int(steps), scale=float(scale), eta=float(eta), negative_prompt=negative or "",
                precision=ui.precision)


def prompt_inputs(name: str, required: bool) -> tuple[gr.Textbox, gr.Textbox]:
    """The prompt and the negative prompt (the unconditional side of classifier-free guidance)."""
    prompt = gr.Textbox(label="Prompt (--prompt)", lines=2, elem_id=f"{name}-prompt",
                        placeholder="a red circle on a white background" if required else "(may be empty)")
    negative = gr.Textbox(label="Negative prompt (empty: the unconditional caption, as the scripts)",
                          elem_id=f"{name}-negative")
    return prompt, negative


def sampling_inputs(name: str, scale: float, batch_label: str = "Batch size (--n_samples)",
                    eta_label: str = "DDIM eta (--ddim_eta)") -> list:
    """Steps, guidance scale, eta, seed and how many images."""
    with gr.Row():
        steps = gr.Slider(1, 500, value=50, step=1, label="Steps (--steps)", elem_id=f"{name}-steps")
        scale_box = gr.Slider(1.0, 20.0, value=scale, step=0.5, label="Guidance scale (--scale)")
    with gr.Row():
        eta = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label=eta_label, elem_id=f"{name}-eta")
        seed = gr.Number(value=42, precision=0, label="Seed (--seed; -1: a random one)", elem_id=f"{name}-seed")
        batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label=batch_label, elem_id=f"{name}-batch")
    return [steps, scale_box, eta, seed, batch]


def output_column(name: str) -> Outputs:
    """Generate and Cancel, the results of the last job, its status line and each image's settings."""
    with gr.Column(scale=1):
        with gr.Row():
            generate = gr.Button("Generate", variant="primary", elem_id=f"{name}-generate")
            cancel = gr.Button("Cancel", variant="stop", elem_id=f"{name}-cancel")
        gallery = gr.Gallery(label="Results", columns=4, height=360, object_fit="contain", interactive=False,
                             preview=False, fit_columns=False, elem_id=f"{name}-gallery")
        status = gr.Markdown(elem_id=f"{name}-status")
        info = gr.JSON(label="Seed and settings of each image (its PNG metadata)", elem_id=f"{name}-info")
    return Outputs(generate, cancel, gallery, status, info)


def wire(ui: WebUI, tab: Tab, fn: Callable, inputs: Sequence, out: Outputs, history: gr.State,
         history_gallery: gr.Gallery) -> None:
    """Generate runs `fn` on the queue (API name: the tab's), Cancel stops this session's job."""
    event = out.generate.click(fn, [*inputs, history], [out.gallery, out.info, out.status, history_gallery, history],
                               api_name=tab.name, concurrency_id=CONCURRENCY_ID)
    out.cancel.click(ui.cancel, None, out.status, cancels=[event], queue=False, api_name=f"cancel_{tab.name}")


def native_size(model: Any) -> int:
    """The image side the model was trained for (latent side times the first stage's factor)."""
    return int(getattr(model, "image_size", 64)) * inf.first_stage_factor(model)


def pick_seed(seed: float | int | None) -> int:
    """The seed box's value; negative (or empty) picks a random one."""
    if seed is None or seed == "" or int(seed) < 0:
        return secrets.randbelow(2**31)
    return int(seed)


def as_int(value: Any) -> int:
    """A number box's value as an int (empty: 0, which the checks then name)."""
    return 0 if value is None or value == "" else int(value)


# ----------------------------------------------------------------------------------------- txt2img
def sampler_inputs(name: str) -> tuple[gr.Dropdown, gr.Dropdown, gr.Slider]:
    """The sampler (every name of the registry, `ldm.inference.SAMPLERS`), its noise-level spacing and the
    guidance rescale."""
    sampler = gr.Dropdown(list(inf.SAMPLERS), value=inf.SAMPLERS[0], label="Sampler (--sampler)",
                          elem_id=f"{name}-sampler")
    with gr.Row():
        spacing = gr.Dropdown([DEFAULT_SPACING, *SPACINGS], value=DEFAULT_SPACING, label="Schedule (--schedule)",
                              elem_id=f"{name}-schedule")
        rescale = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Guidance rescale (--guidance_rescale; 0: off)",
                            elem_id=f"{name}-guidance-rescale")
    return sampler, spacing, rescale


def sampler_settings(ui: WebUI, sampler: str, spacing: str | None, rescale: float, steps: float, scale: float,
                     eta: float, negative: str) -> dict[str, Any]:
    """A `SampledTask`'s settings from the page's values: the sampler, its spacing (none for the default), the
    guidance rescale and eta as txt2img.py's --ddim_eta (0 leaves an ancestral sampler its own)."""
    options = settings(ui, steps, scale, eta, negative)
    options["eta"] = inf.resolve_eta(sampler, None, options["eta"])
    return dict(options, sampler=sampler, spacing=None if spacing in (None, "", DEFAULT_SPACING) else spacing,
                guidance_rescale=float(rescale or 0.0))


def build_txt2img(ui: WebUI, tab: Tab, history: gr.State, history_gallery: gr.Gallery) -> TabParts:
    """Prompt, negative prompt, sampler, schedule, guidance rescale, steps, scale, eta, size, seed, batch."""
    with gr.Row():
        with gr.Column(scale=1):
            prompt, negative = prompt_inputs(tab.name, required=True)
            sampler, spacing, rescale = sampler_inputs(tab.name)
            with gr.Row():
                height = gr.Number(value=512, precision=0, label="Height (--H)", elem_id=f"{tab.name}-height")
                width = gr.Number(value=512, precision=0, label="Width (--W)", elem_id=f"{tab.name}-width")
            steps, scale, eta, seed, batch = sampling_inputs(
                tab.name, scale=7.5, eta_label="Eta (--ddim_eta; 0 leaves an ancestral sampler its own, 1)")
        out = output_column(tab.name)

    def txt2img(prompt: str, negative: str, sampler: str, steps: float, scale: float, eta: float, height: float,
                width: float, seed: float, batch: float, spacing: str | None, rescale: float, history: list,
                request: gr.Request, progress: gr.Progress = gr.Progress()) -> tuple:
        def body(loaded: Loaded, report: Progress) -> list[Samples]:
            inf.check_prompt(prompt, alternative="")
            first = pick_seed(seed)
            job = Txt2Img(loaded.model, loaded.ckpt, height=as_int(height), width=as_int(width),
                          **sampler_settings(ui, sampler, spacing, rescale, steps, scale, eta, negative))
            inf.seed_everything(first)
            return [job([prompt] * int(batch), inf.sample_seeds(first, int(batch)), report)]

        return ui.run(tab, request, progress, history, body)

    # spacing and rescale come last so that API calls written before they existed keep their positions
    wire(ui, tab, txt2img, [prompt, negative, sampler, steps, scale, eta, height, width, seed, batch, spacing,
                            rescale], out, history, history_gallery)
    return TabParts({height: native_size, width: native_size})


# ----------------------------------------------------------------------------------------- img2img
def build_img2img(ui: WebUI, tab: Tab, history: gr.State, history_gallery: gr.Gallery) -> TabParts:
    """Init image, prompt, strength, steps, scale, eta, seed, batch."""
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("Image", "--init-img", f"{tab.name}-image")
            prompt, negative = prompt_inputs(tab.name, required=False)
            strength = gr.Slider(0.0, 1.0, value=0.75, step=0.05, label="Strength (--strength)",
                                 elem_id=f"{tab.name}-strength")
            steps, scale, eta, seed, batch = sampling_inputs(tab.name, scale=5.0)
        out = output_column(tab.name)

    def img2img(image: str | None, prompt: str, negative: str, strength: float, steps: float, scale: float,
                eta: float, seed: float, batch: float, history: list, request: gr.Request,
                progress: gr.Progress = gr.Progress()) -> tuple:
        def body(loaded: Loaded, report: Progress) -> list[Samples]:
            first = pick_seed(seed)
            job = Img2Img(loaded.model, loaded.ckpt, image=read(image, "--init-img"), image_path=image,
                          strength=float(strength), **settings(ui, steps, scale, eta, negative))
            if job.cropped_from:
                gr.Info(f"The image was cropped from {job.cropped_from[0]}x{job.cropped_from[1]} to "
                        f"{job.size[0]}x{job.size[1]} (multiples of the model's downsampling factor)")
            inf.seed_everything(first)
            return [job([prompt or ""] * int(batch), inf.sample_seeds(first, int(batch)), report)]

        return ui.run(tab, request, progress, history, body)

    wire(ui, tab, img2img, [image, prompt, negative, strength, steps, scale, eta, seed, batch], out, history,
         history_gallery)
    return TabParts()


# ----------------------------------------------------------------------------------------- inpainting
def drawn_mask(layers: Sequence[str]) -> Image.Image | None:
    """The painted pixels of the editor's layers (their alpha, brightest wins) as a mask image; None if unpainted."""
    alphas = [Image.open(path).convert("RGBA").getchannel("A") for path in layers or ()]
    if not alphas:
        return None
    mask = alphas[0]
    for alpha in alphas[1:]:
        mask = ImageChops.lighter(mask, alpha) if alpha.size == mask.size else mask
    return mask if mask.getbbox() else None


def build_inpaint(ui: WebUI, tab: Tab, history: gr.State, history_gallery: gr.Gallery) -> TabParts:
    """An image editor to paint the mask on (or a mask upload), prompt, steps, scale, eta, seed, variations."""
    with gr.Row():
        with gr.Column(scale=1):
            editor = guard_upload(gr.ImageEditor(
                label="Image (--image): paint the region to fill", type="filepath", image_mode="RGBA",
                sources=["upload", "clipboard"], brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                layers=False, transforms=None, format="png", elem_id=f"{tab.name}-editor"), "--image")
            mask = image_input("Mask instead of painting: white = fill in", "--mask", f"{tab.name}-mask")
            prompt, negative = prompt_inputs(tab.name, required=False)
            steps, scale, eta, seed, batch = sampling_inputs(tab.name, scale=1.0,
                                                             batch_label="Variations (seeds seed, seed + 1, ...)")
        out = output_column(tab.name)

    def inpaint(editor: dict | None, mask: str | None, prompt: str, negative: str, steps: float, scale: float,
                eta: float, seed: float, batch: float, history: list, request: gr.Request,
                progress: gr.Progress = gr.Progress()) -> tuple:
        def body(loaded: Loaded, report: Progress) -> list[Samples]:
            background = (editor or {}).get("background")
            image = read(background, "--image")
            if mask:
                mask_image, mask_path = read(mask, "--mask", mode="L"), mask
            else:
                mask_image, mask_path = drawn_mask((editor or {}).get("layers")), "drawn"
            if mask_image is None:
                raise inf.ScriptError("--mask: nothing is painted; paint the region to fill (or upload a mask)")
            job = inpaint_input(image, mask_image, background, mask_path, inf.image_multiple(loaded.model),
                                loaded.model.device)
            task = Inpaint(loaded.model, loaded.ckpt, prompt=prompt or "", **settings(ui, steps, scale, eta, negative))
            if not prompt and inf.is_text_model(loaded.model):
                gr.Warning("The prompt is empty: the model fills the region unconditionally")
            return [task(job, s, report) for s in inf.sample_seeds(pick_seed(seed), int(batch))]

        return ui.run(tab, request, progress, history, body)

    wire(ui, tab, inpaint, [editor, mask, prompt, negative, steps, scale, eta, seed, batch], out, history,
         history_gallery)
    return TabParts()


# ----------------------------------------------------------------------------------------- super-resolution
def build_superres(ui: WebUI, tab: Tab, history: gr.State, history_gallery: gr.Gallery) -> TabParts:
    """Low-resolution image, prompt and noise level (x4 upscaler), steps, scale, eta, seed, variations."""
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("Low-resolution image", "--image", f"{tab.name}-image")
            prompt, negative = prompt_inputs(tab.name, required=False)
            noise_level = gr.Number(value=20, precision=0, label="Noise level (--noise_level; x4 upscaler)",
                                    elem_id=f"{tab.name}-noise-level")
            steps, scale, eta, seed, batch = sampling_inputs(tab.name, scale=9.0,
                                                             batch_label="Variations (seeds seed, seed + 1, ...)")
        out = output_column(tab.name)

    def superres(image: str | None, prompt: str, negative: str, noise_level: float, steps: float, scale: float,
                 eta: float, seed: float, batch: float, history: list, request: gr.Request,
                 progress: gr.Progress = gr.Progress()) -> tuple:
        def body(loaded: Loaded, report: Progress) -> list[Samples]:
            low = read(image, "--image")
            task = SuperRes(loaded.model, loaded.ckpt, prompt=prompt or "", noise_level=as_int(noise_level),
                            **settings(ui, steps, scale, eta, negative))
            prepared = [task.prepare(low, image, s) for s in inf.sample_seeds(pick_seed(seed), int(batch))]
            return [task(item, report) for item in prepared]

        return ui.run(tab, request, progress, history, body)

    wire(ui, tab, superres, [image, prompt, negative, noise_level, steps, scale, eta, seed, batch], out, history,
         history_gallery)
    return TabParts()


# ----------------------------------------------------------------------------------------- depth-to-image
def build_depth2img(ui: WebUI, tab: Tab, history: gr.State, history_gallery: gr.Gallery) -> TabParts:
    """Init image, optional depth image (else MiDaS' estimate), prompt, strength, steps, scale, eta, seed, batch."""
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("Image", "--init-img", f"{tab.name}-image")
            depth = image_input("Depth instead of MiDaS' estimate: brighter = nearer", "--depth-img",
                                f"{tab.name}-depth")
            prompt, negative = prompt_inputs(tab.name, required=True)
            strength = gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="Strength (--strength)",
                                 elem_id=f"{tab.name}-strength")
            steps, scale, eta, seed, batch = sampling_inputs(tab.name, scale=9.0)
        out = output_column(tab.name)

    def depth2img(image: str | None, depth: str | None, prompt: str, negative: str, strength: float, steps: float,
                  scale: float, eta: float, seed: float, batch: float, history: list, request: gr.Request,
                  progress: gr.Progress = gr.Progress()) -> tuple:
        def body(loaded: Loaded, report: Progress) -> list[Samples]:
            inf.check_prompt(prompt, alternative="")
            first = pick_seed(seed)
            job = Depth2Img(loaded.model, loaded.ckpt, image=read(image, "--init-img"), image_path=image,
                            depth_image=read(depth, "--depth-img", mode="L") if depth else None, depth_path=depth,
                            strength=float(strength), **settings(ui, steps, scale, eta, negative))
            inf.seed_everything(first)
            return [job([prompt] * int(batch), inf.sample_seeds(first, int(batch)), report)]

        return ui.run(tab, request, progress, history, body)

    wire(ui, tab, depth2img, [image, depth, prompt, negative, strength, steps, scale, eta, seed, batch], out,
         history, history_gallery)
    return TabParts()


# ----------------------------------------------------------------------------------------- image variations
def build_variations(ui: WebUI, tab: Tab, history: gr.State, history_gallery: gr.Gallery) -> TabParts:
    """Init image, prompt (may be empty), noise level, steps, scale, eta, seed, batch."""
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("Image", "--init-img", f"{tab.name}-image")
            prompt, negative = prompt_inputs(tab.name, required=False)
            noise_level = gr.Number(value=0, precision=0, label="Noise level of the image embedding (--noise_level)",
                                    elem_id=f"{tab.name}-noise-level")
            steps, scale, eta, seed, batch = sampling_inputs(tab.name, scale=10.0)
        out = output_column(tab.name)

    def variations(image: str | None, prompt: str, negative: str, noise_level: float, steps: float, scale: float,
                   eta: float, seed: float, batch: float, history: list, request: gr.Request,
                   progress: gr.Progress = gr.Progress()) -> tuple:
        def body(loaded: Loaded, report: Progress) -> list[Samples]:
            first = pick_seed(seed)
            job = ImageVariations(loaded.model, loaded.ckpt, image=read(image, "--init-img"), image_path=image,
                                  noise_level=as_int(noise_level), **settings(ui, steps, scale, eta, negative))
            inf.seed_everything(first)
            return [job([prompt or ""] * int(batch), inf.sample_seeds(first, int(batch)), report)]

        return ui.run(tab, request, progress, history, body)

    wire(ui, tab, variations, [image, prompt, negative, noise_level, steps, scale, eta, seed, batch], out, history,
         history_gallery)
    return TabParts()


# ----------------------------------------------------------------------------------------- layout / label map
def build_maps(ui: WebUI, tab: Tab, history: gr.State, history_gallery: gr.Gallery) -> TabParts:
    """A layout file or a label map, the layout's image size, sampler, schedule, steps, eta, seed, samples per input."""
    with gr.Row():
        with gr.Column(scale=1):
            layout = gr.File(label='Layout: JSON, [{"class": ..., "bbox": [x0, y0, w, h]}, ...] (--layout)',
                             file_types=[".json"], type="filepath", elem_id=f"{tab.name}-layout")
            segmentation = image_input("Label map: one label index per pixel", "--segmentation",
                                       f"{tab.name}-segmentation")
            sampler, spacing, rescale = sampler_inputs(tab.name)
            with gr.Row():
                height = gr.Number(value=0, precision=0, label="Height of a layout's images (--H; 0: the model's)",
                                   elem_id=f"{tab.name}-height")
                width = gr.Number(value=0, precision=0, label="Width (--W; 0: the model's)",
                                  elem_id=f"{tab.name}-width")
            steps, scale, eta, seed, batch = sampling_inputs(
                tab.name, scale=1.0, batch_label="Samples per input (--n_samples)",
                eta_label="Eta (--ddim_eta; 0 leaves an ancestral sampler its own, 1)")
        out = output_column(tab.name)

    def maps(layout: str | None, segmentation: str | None, sampler: str, steps: float, scale: float, eta: float,
             height: float, width: float, seed: float, batch: float, spacing: str | None, rescale: float,
             history: list, request: gr.Request, progress: gr.Progress = gr.Progress()) -> tuple:
        def body(loaded: Loaded, report: Progress) -> list[Samples]:
            native = native_size(loaded.model)
            job = MapToImage(loaded.model, loaded.ckpt, height=as_int(height) or native,
                             width=as_int(width) or native,
                             **sampler_settings(ui, sampler, spacing, rescale, steps, scale, eta, ""))
            inputs = job.read_inputs(layout, [segmentation] if segmentation else None)
            first = pick_seed(seed)
            inf.seed_everything(first)
            return list(job.sample_each(inputs, first, int(batch), report))

        return ui.run(tab, request, progress, history, body)

    wire(ui, tab, maps, [layout, segmentation, sampler, steps, scale, eta, height, width, seed, batch, spacing,
                         rescale], out, history, history_gallery)
    return TabParts()


TABS: tuple[Tab, ...] = (
    Tab("txt2img", "Text to image", Txt2Img.supports, build_txt2img),
    Tab("img2img", "Image to image", Img2Img.supports, build_img2img),
    Tab("inpaint", "Inpainting", Inpaint.supports, build_inpaint),
    Tab("superres", "Super-resolution", SuperRes.supports, build_superres),
    Tab("depth2img", "Depth to image", Depth2Img.supports, build_depth2img),
    Tab("variations", "Image variations", ImageVariations.supports, build_variations),
    Tab("maps", "Layout / label map to image", MapToImage.supports, build_maps),
)
