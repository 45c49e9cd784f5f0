"""The gradio app: a model chooser, one tab per task the loaded model supports (`ldm.webui.tabs.TABS`), a gallery
of the session's results so far. Every job runs through `WebUI.run`: one job at a time on the one model (gradio's
queue shows the position of the others), progress from the sampler's steps, cancel at the next step, user
mistakes shown as one-line messages, results written as the scripts write them (PNG text metadata) under --outdir.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.pipelines import Progress, Samples  # noqa: E402
from ldm.webui.models import Cancelled, Loaded, ModelSlot, ModelSpec  # noqa: E402
from ldm.webui.tabs import CONCURRENCY_ID, TABS, Tab, TabParts  # noqa: E402

logger = logging.getLogger(__name__)

CAPTION_KEYS = ("seed", "sampler", "schedule", "steps", "scale", "guidance_rescale", "strength", "noise_level", "mode")


def one_line(err: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(err).split())


def caption(meta: dict[str, Any]) -> str:
    """The seed and the main settings of one result, for its gallery caption."""
    return " · ".join(f"{key} {meta[key]}" for key in CAPTION_KEYS if key in meta)


def describe(loaded: Loaded | None) -> str:
    """The model panel's text: what is loaded and the tasks it supports."""
    if loaded is None:
        return "No model is loaded."
    model = loaded.model
    tasks = ", ".join(tab.label for tab in TABS if tab.supports(model)) or "none of this UI's tasks"
    return (f"**{loaded.spec.path}** ({inf.checkpoint_label(loaded.ckpt)}): {type(model).__name__}, image sides "
            f"multiples of {inf.image_multiple(model)}. Tasks: {tasks}.")


class WebUI:
    """The app's state: the model slot, the models offered, where results go and the precision jobs run in."""

    def __init__(self, slot: ModelSlot, specs: Sequence[ModelSpec], outdir: str, precision: str = "autocast"):
        self.slot, self.specs, self.outdir, self.precision = slot, list(specs), outdir, precision
        self.parts: dict[str, TabParts] = {}

    # ------------------------------------------------------------------------------------- jobs
    def run(self, tab: Tab, request: gr.Request | None, progress: gr.Progress, history: list,
            body: Callable[[Loaded, Progress], list[Samples]]) -> tuple:
        """Run one job of `tab` on the loaded model and write its results; returns the tab's outputs
        (gallery, metadata, status, history gallery, history)."""
        session = getattr(request, "session_hash", None)
        start = time.perf_counter()
        try:
            with self.slot.job(session) as loaded:
                if not tab.supports(loaded.model):
                    raise inf.ScriptError(f"the loaded model '{loaded.spec.path}' does not do {tab.label.lower()}; "
                                          "load another model")
                results = body(loaded, self.progress(progress))
                items = self.save(tab.name, results)
        except Cancelled as stop:
            message = f"{stop}; nothing was written"
            gr.Warning(message.capitalize())
            return gr.skip(), gr.skip(), message.capitalize(), gr.skip(), gr.skip()
        except inf.USER_ERRORS as err:
            raise gr.Error(one_line(err), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as err:  # a bug, not a user mistake: shown in the page, the traceback in the server log
            logger.exception("%s failed", tab.name)
            raise gr.Error(f"{tab.label} failed: {type(err).__name__}: {one_line(err)} (traceback in the server "
                           "log)", print_exception=False) from None
        gallery = [(path, caption(meta)) for path, meta in items]
        history = gallery + list(history or [])
        status = (f"{len(items)} image(s) in {time.perf_counter() - start:.1f} s, written to "
                  f"{os.path.dirname(items[0][0])}")
        return gallery, [meta for _, meta in items], status, history, history

    def progress(self, progress: gr.Progress) -> Progress:
        """The pipelines' progress(done, total): cancels when asked, then moves the page's progress bar."""
        def report(done: int, total: int) -> None:
            self.slot.check_cancelled(done, total)
            progress((done, total), desc="Sampling", unit="steps")

        return report

    def save(self, task: str, results: Sequence[Samples]) -> list[tuple[str, dict[str, Any]]]:
        """Write every result as `<outdir>/<task>/NNNNN.png` with its metadata; (path, metadata) pairs."""
        folder = os.path.join(self.outdir, task)
        items = []
        for samples in results:
            items += zip(inf.save_samples(samples.images, folder, samples.metadata), samples.metadata)
        return items

    def cancel(self, request: gr.Request) -> str | dict:
        """Stop this session's running job at its next step."""
        if self.slot.cancel(getattr(request, "session_hash", None)):
            return "Cancelling at the next step..."
        return gr.skip()

    # ------------------------------------------------------------------------------------- models
    def spec_of(self, path: str) -> ModelSpec:
        """The offered model of that path, or a run / checkpoint typed into the box."""
        for spec in self.specs:
            if spec.path == path:
                return spec
        return ModelSpec(path)

    def load(self, path: str, progress: gr.Progress = gr.Progress()) -> list:
        """Load the chosen model (the previous one is released first); the panel text and each tab's visibility."""
        if not (path or "").strip():
            raise gr.Error("choose a model: a main.py run directory or a checkpoint inside one")
        progress(0.0, desc=f"Loading {path}")
        try:
            loaded = self.slot.load(self.spec_of(path.strip()))
        except inf.USER_ERRORS as err:
            raise gr.Error(one_line(err), print_exception=False) from None
        visible = self.visible_tabs(loaded)
        return [describe(loaded), gr.update(selected=visible[0] if visible else None), *self.tab_updates(loaded)]

    def visible_tabs(self, loaded: Loaded | None) -> list[str]:
        """The names of the tabs shown for the loaded model: the tasks it supports."""
        return [tab.name for tab in TABS if loaded is not None and tab.supports(loaded.model)]

    def tab_updates(self, loaded: Loaded | None) -> list:
        """Each tab shown or hidden (and disabled: gradio keeps the button of a tab hidden after the page was drawn)
        for the loaded model, and the values that follow the model."""
        visible, updates = self.visible_tabs(loaded), []
        for tab in TABS:
            updates.append(gr.update(visible=tab.name in visible, interactive=tab.name in visible))
            updates += [default(loaded.model) if tab.name in visible else gr.skip()
                        for default in self.parts[tab.name].defaults.values()]
        return updates

    # ------------------------------------------------------------------------------------- page
    def launch(self, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> gr.Blocks:
        """Build the page and serve it on host:port (never a public share link): one job at a time, the others
        queued; results are served from --outdir. Returns at once (still serving) unless `block`."""
        self.blocks = self.build().queue(default_concurrency_limit=1)
        self.blocks.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                           quiet=not block, show_error=True, allowed_paths=[self.outdir], ssr_mode=False,
                           theme=theme(), mcp_server=False)
        return self.blocks

    def build(self) -> gr.Blocks:
        """The page."""
        loaded = self.slot.loaded
        with gr.Blocks(title="ldm web UI") as blocks:
            gr.Markdown("## Latent diffusion")
            with gr.Row(equal_height=True):
                chooser = gr.Dropdown([spec.path for spec in self.specs], label="Model (-r/--resume: a main.py run, "
                                      "or a checkpoint inside one)", value=loaded.spec.path if loaded else None,
                                      allow_custom_value=True, scale=4, elem_id="model-path")
                load = gr.Button("Load", scale=1, elem_id="model-load")
            about = gr.Markdown(describe(loaded), elem_id="model-about")
            history = gr.State([])
            history_gallery = gr.Gallery(label="Results so far (this session, newest first)", columns=10, height=220,
                                         object_fit="contain", interactive=False, preview=False, fit_columns=False,
                                         render=False, elem_id="history")
            outputs = []
            with gr.Tabs() as tabs:
                for tab in TABS:
                    with gr.Tab(tab.label, id=tab.name, visible=tab.name in self.visible_tabs(loaded)) as item:
                        self.parts[tab.name] = parts = tab.build(self, tab, history, history_gallery)
                    outputs += [item, *parts.defaults]
            history_gallery.render()
            load.click(self.load, chooser, [about, tabs, *outputs], api_name="load_model", concurrency_id=CONCURRENCY_ID)
        return blocks


def theme() -> gr.themes.Base:
    """gradio's default look with the system's fonts (the default theme fetches its fonts from Google)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])
