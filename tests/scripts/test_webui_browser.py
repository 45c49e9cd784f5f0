"""The web UI end to end in headless Chromium (Debian's `chromium` package, driven by Playwright through its
executable_path; no browser download): open the page, go to the inpainting tab, upload an image, paint a stroke on
the canvas, type a prompt, press Generate and find the result in the page (a screenshot is kept as an artifact); then
load a super-resolution model and see the tabs follow it.

Skipped only when no Chromium is installed (`.ci/run` installs it). With LDM_WEBUI_SCREENSHOT=docs/webui.png the
README's screenshot is written from this test's."""
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.shapes import ShapesValidation

CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium():
    """The Chromium binary (the real one behind Debian's /usr/bin/chromium wrapper when there is one)."""
    for path in (os.environ.get("LDM_CHROMIUM"), *CHROMIUM_PATHS, shutil.which("chromium")):
        if path and os.access(path, os.X_OK):
            return path
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(chromium() is None, reason="no Chromium installed: apt-get install "
                                                   "chromium (or set LDM_CHROMIUM) to run the browser test")]


def save_small(shot, path, width=960, colors=96):
    """A copy of the screenshot for the README: narrower, with a palette of `colors` (a small PNG)."""
    with Image.open(shot) as image:
        image = image.convert("RGB")
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        image.quantize(colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(scripts, text_run, tiny_runs, tmp_path):
    """The web UI on the tiny text run, offering the tiny super-resolution run as the second model."""
    outdir = tmp_path / "out"
    port = free_port()
    sr_run = tiny_runs("concat").logdir
    args = scripts("webui").get_parser().parse_args(["-r", str(text_run.logdir), "-r", str(sr_run), "--port",
                                                     str(port), "--outdir", str(outdir), "--device", "cpu"])
    ui = scripts("webui").serve(args, block=False)
    yield f"http://127.0.0.1:{port}/", outdir, sr_run
    ui.blocks.close()


def test_paint_a_mask_generate_and_see_the_result(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, outdir, sr_run = served
    image = ShapesValidation(size=16, length=1, seed=3)[0]["image"]
    source = tmp_path / "shape.png"
    Image.fromarray(((image + 1) * 127.5).round().astype(np.uint8)).save(source)
    start = time.perf_counter()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="Inpainting").click()
            editor = page.locator("#inpaint-editor")
            expect(editor.locator("button[aria-label='Upload']")).to_be_visible(timeout=30_000)  # the editor is drawn
            editor.locator("input[type=file]").first.set_input_files(str(source))
            brush_size = editor.locator("button[aria-label='Brush Size']")  # shown once the image is on the canvas
            expect(brush_size).to_be_visible(timeout=30_000)
            brush_size.click()
            editor.locator("input[type=range]").first.fill("2")  # radius 2 of the 16 pixels (the default is 25)
            page.keyboard.press("Escape")
            box = editor.locator("canvas").last.bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # the image is centred
            page.mouse.move(x - 40, y - 20)
            page.mouse.down()
            page.mouse.move(x + 60, y + 30, steps=12)
            page.mouse.up()
            page.locator("#inpaint-prompt textarea").fill("a blue square on a black background")
            page.locator("#inpaint-steps input[type=number]").fill("10")
            page.locator("#inpaint-generate").click()
            result = page.locator("#inpaint-gallery img").first
            expect(result).to_be_visible(timeout=60_000)
            expect(page.locator("#inpaint-status")).to_contain_text("1 image(s) in", timeout=30_000)
            assert page.evaluate("img => img.naturalWidth", result.element_handle()) == 16
            shot = tmp_path / "webui.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"browser screenshot: {shot}")
            if os.environ.get("LDM_WEBUI_SCREENSHOT"):  # e.g. docs/webui.png, the README's
                save_small(shot, os.environ["LDM_WEBUI_SCREENSHOT"])
            page.locator("#model-path input").fill(str(sr_run))  # another model: its tabs only
            page.keyboard.press("Enter")
            page.locator("#model-load").click()
            expect(page.get_by_role("tab", name="Super-resolution")).to_be_enabled(timeout=30_000)
            expect(page.get_by_role("tab", name="Inpainting")).to_be_disabled()
            expect(page.locator("#model-about")).to_contain_text("Tasks: Super-resolution.")
        finally:
            browser.close()
    written = sorted((outdir / "inpaint").glob("*.png"))
    assert len(written) == 1
    with Image.open(written[0]) as result_image:
        result_image.load()
        painted, meta = np.asarray(result_image.convert("RGB")), dict(result_image.text)
    original = np.asarray(Image.open(source).convert("RGB"))
    changed = np.any(painted != original, axis=-1)
    assert 0 < changed.sum() < changed.size  # the stroke was painted over, the rest of the image kept
    assert meta["mask"] == "drawn" and meta["prompt"] == "a blue square on a black background" and meta["steps"] == "10"
    assert time.perf_counter() - start < 60
