"""A gradio web UI over the sampling scripts' code paths (`ldm.pipelines`): `python scripts/webui.py -r logs/<run>`."""
from ldm.webui.app import WebUI
from ldm.webui.models import Cancelled, ModelSlot, ModelSpec
from ldm.webui.tabs import TABS, Tab

__all__ = ["Cancelled", "ModelSlot", "ModelSpec", "TABS", "Tab", "WebUI"]
