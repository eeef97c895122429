"""The Gradio demo driven in a real headless Chromium (Debian's /usr/bin/chromium through Playwright).

One browser session walks the three tabs as a user would: upload an image, ask where an object is, see the streamed
answer and the box drawn over the image; draw "a dog with a hat" from the examples; caption a good and a broken file.
The engine's parts are scripted (see `scripted_models.py`) so the test knows which box and colours to expect; the
engine, the demo and Gradio are real. Screenshots are saved in the test's tmp dir; the page logs no console errors.
"""

from __future__ import annotations

import io
import re
import socket
from pathlib import Path

import httpx
import pytest
from PIL import Image
from scripted_models import colour_of, fingerprint, scripted_engine

from multimodal.image import load_image
from multimodal.world import make_scene, render

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]
BOX_RED = (230, 25, 75)  # the first box colour of multimodal.image.draw_boxes (#e6194b)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make browser)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch_image(base_url: str, src: str) -> Image.Image:
    url = src if src.startswith("http") else base_url.rstrip("/") + "/" + src.lstrip("/")
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def test_demo_in_a_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from demos.app import build_app, launch

    photo = tmp_path / "green.png"
    Image.new("RGB", (200, 200), (40, 160, 40)).save(photo)
    broken = tmp_path / "broken.png"
    broken.write_bytes(photo.read_bytes()[:80])
    deep = tmp_path / "deep.png"  # 16-bit grey: a browser-side RGB conversion clips it to white
    Image.new("I;16", (64, 48), 20000).save(deep)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")

    engine = scripted_engine()
    engine.scene_maker = lambda seed: render(make_scene(seed))  # a real scene: a lossy hand-over would change it
    app = build_app(engine)
    _, url, _ = launch(app, port=free_port(), block=False)
    problems: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(url)

            # Chat & ground: upload, ask, see the streamed answer and the drawn box.
            page.locator("#chat-upload input[type=file]").set_input_files(str(photo))
            expect(page.locator("#chat-image img")).to_be_visible(timeout=20_000)
            page.locator("#q textarea").fill("Where is the dog?")
            page.locator("#ask").click()
            expect(page.locator("#chat")).to_contain_text("Where is the dog? -> the thing", timeout=20_000)
            expect(page.locator("#chat")).to_contain_text("rgb 40 160 40")
            boxed = page.locator("#boxed img")
            expect(boxed).to_be_visible(timeout=20_000)
            drawn = fetch_image(url, boxed.get_attribute("src"))
            assert drawn.size == (200, 200)
            # [[250,250,750,750]] on a 200x200 image: the box's left edge is at x=50, inside it the photo.
            assert drawn.getpixel((50, 100)) == BOX_RED
            assert drawn.getpixel((100, 100)) == (40, 160, 40)
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

            # Draw: the example prompt, then base and relay side by side.
            page.get_by_role("tab", name="Draw").click()
            page.get_by_text("a dog with a hat", exact=True).click()
            expect(page.locator("#prompt textarea")).to_have_value("a dog with a hat")
            page.locator("#draw").click()
            relay = page.locator("#relay img")
            expect(relay).to_be_visible(timeout=20_000)
            expect(page.locator("#base img")).to_be_visible()
            final = fetch_image(url, relay.get_attribute("src"))
            assert final.size == (32, 32) and final.getpixel((5, 5)) == colour_of("a dog with a hat", 0)
            page.screenshot(path=str(tmp_path / "draw.png"), full_page=True)

            # Caption: a good and a broken file -> a table with a caption row and an error row, and a JSONL file.
            page.get_by_role("tab", name="Caption").click()
            page.locator("#caption-files input[type=file]").set_input_files([str(photo), str(broken)])
            # Both uploads listed (the file list splits names into stem and suffix, so match the row's name).
            expect(page.locator("#caption-files").get_by_role("row", name=re.compile(r"^broken\.png"))).to_be_visible(
                timeout=20_000)
            page.locator("#caption").click()
            table = page.locator("#caption-table")
            expect(table).to_contain_text("truncated or corrupt", timeout=20_000)
            expect(table).to_contain_text("Describe the image. -> the thing")
            error_header = table.get_by_text("error", exact=True).first.bounding_box()
            assert error_header["x"] + error_header["width"] <= 1280  # the error column is on screen
            expect(page.locator("#caption-jsonl")).to_contain_text("captions.jsonl")
            page.screenshot(path=str(tmp_path / "caption.png"), full_page=True)

            # A request the demo cannot serve gives one friendly sentence.
            page.get_by_role("tab", name="Chat & ground").click()
            page.locator("#q textarea").fill("   ")
            page.locator("#ask").click()
            expect(page.get_by_text("Type a question about the image.")).to_be_visible(timeout=20_000)
            # Files Pillow cannot open: one sentence each, no error badges, and the model keeps the image it had.
            toast = page.get_by_test_id("toast-body")
            bad_files = ((broken, "'broken.png' is truncated or corrupt"), (empty, "'empty.jpg' is an empty file"))
            for bad, sentence in bad_files:
                page.locator("#chat-upload input[type=file]").set_input_files(str(bad))
                expect(toast.get_by_text(sentence)).to_be_visible(timeout=20_000)
            page.screenshot(path=str(tmp_path / "bad-upload.png"), full_page=True)
            for component in ("#chat-upload", "#chat-image", "#boxed", "#chat"):
                expect(page.locator(f"{component} .error")).to_have_count(0)

            # The model sees the file as the CLI reads it: a 16-bit PNG is not clipped to white.
            page.locator("#chat-upload input[type=file]").set_input_files(str(deep))
            page.locator("#q textarea").fill("What is this?")
            page.locator("#ask").click()
            expect(page.locator("#chat")).to_contain_text("What is this? -> the thing", timeout=20_000)
            expect(page.locator("#chat")).to_contain_text(fingerprint(load_image(deep)))

            # A scene replaces the image, starts a new conversation and reaches the model losslessly.
            page.locator("#make-scene").click()
            expect(page.locator("#chat")).not_to_contain_text("What is this?", timeout=20_000)
            expect(page.locator("#chat-image img")).to_be_visible()
            page.locator("#q textarea").fill("And this?")
            page.locator("#ask").click()
            expect(page.locator("#chat")).to_contain_text(fingerprint(render(make_scene(0))), timeout=20_000)
            browser.close()

        oversized = httpx.post(url.rstrip("/") + "/gradio_api/upload",
                               files={"files": ("big.png", b"\0" * (11 * 1024 * 1024), "image/png")}, timeout=60)
        assert oversized.status_code == 413
    finally:
        app.close()
    assert problems == []
    for name in ("chat.png", "draw.png", "caption.png"):
        assert (tmp_path / name).stat().st_size > 10_000
