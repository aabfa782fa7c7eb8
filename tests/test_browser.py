"""The app as a person uses it: Debian Chromium (headless, via playwright) against the smoke-mode app on 127.0.0.1.

Types a prompt, clicks Generate, waits for the galleries and the 3D viewer, downloads the GLB and loads it with
trimesh, and takes a screenshot. Uploads a cut-out (RGBA): the page says its transparency was the mask and
background removal was skipped. Uploads a fully transparent image: the page shows one clear error message, no
traceback, and the app keeps serving. The screenshot goes to docs/screenshot.png when that file is missing or
T2MV_UPDATE_SCREENSHOT=1 (so ordinary runs leave the committed one alone). Skipped when /usr/bin/chromium is not
installed (``apt-get install -y chromium``).
"""

import os
import re
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest
import trimesh
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "screenshot.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from t2mv import app
    from t2mv.chain import TextTo3D

    demo = app.build_demo(TextTo3D.tiny(), output_dir=tmp_path_factory.mktemp("runs"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _is_local(url):
    return urlparse(url).hostname in ("127.0.0.1", "localhost", None)


@pytest.fixture
def page():
    """A fresh Chromium page that may only reach 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.route(lambda url: not _is_local(url), lambda route: route.abort())
            yield page
        finally:
            browser.close()


def _upload(page, app_url, path):
    """Open the app, open the image accordion, upload `path` and wait until gradio shows it."""
    from playwright.sync_api import expect

    page.goto(app_url, wait_until="domcontentloaded")
    expect(page.get_by_text("SMOKE MODE")).to_be_visible(timeout=30_000)
    page.get_by_text("… or start from an image").click()
    page.locator("#input-image input[type=file]").set_input_files(str(path))
    expect(page.locator("#input-image img")).to_be_visible(timeout=30_000)


def test_an_rgba_cut_out_keeps_its_alpha(app_url, page, tmp_path):
    from playwright.sync_api import expect

    cut = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    cut.paste((30, 160, 60, 255), (24, 16, 72, 80))
    cut.save(tmp_path / "cut.png")
    _upload(page, app_url, tmp_path / "cut.png")
    page.locator("#generate").click()
    status = page.locator("#status")
    expect(status).to_contain_text("transparency was used as the object mask", timeout=120_000)
    expect(status).to_contain_text("background removal skipped")
    expect(page.locator("#normals img")).to_have_count(6, timeout=30_000)


def test_a_bad_upload_shows_one_clear_error(app_url, page, tmp_path):
    from playwright.sync_api import expect

    Image.new("RGBA", (64, 64), (255, 255, 255, 0)).save(tmp_path / "clear.png")
    _upload(page, app_url, tmp_path / "clear.png")
    page.locator("#generate").click()
    error = page.locator(".toast-body.error")
    expect(error).to_be_visible(timeout=60_000)
    expect(error).to_contain_text("fully transparent: there is no object to reconstruct")
    assert "Traceback" not in page.content()
    expect(page.locator("#normals img")).to_have_count(0)


def test_generate_in_the_browser(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    outside, failed = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500}, accept_downloads=True)
            # Offline, as on an air-gapped machine: anything not on 127.0.0.1 is refused (and recorded).
            page.route(
                lambda url: not _is_local(url), lambda route: (outside.append(route.request.url), route.abort())
            )
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(app_url, wait_until="domcontentloaded")
            expect(page.get_by_text("SMOKE MODE")).to_be_visible(timeout=30_000)

            page.get_by_label("Prompt", exact=True).fill("a red teapot")
            page.locator("#generate").click()

            # Six normals and six colors, the mesh viewer, and the downloads.
            expect(page.locator("#normals img")).to_have_count(6, timeout=120_000)
            expect(page.locator("#colors img")).to_have_count(6, timeout=30_000)
            expect(page.locator("#viewer canvas")).to_be_visible(timeout=30_000)
            expect(page.locator("#timings")).to_contain_text("multiview")  # a table of stage timings, not JSON
            expect(page.locator("#timings")).to_contain_text("total")
            rows = page.locator("#downloads tr")
            for name in ("mesh.glb", "mesh_obj.zip", "mesh.ply", "mesh.stl", "multiview.zip"):
                expect(rows.filter(has=page.locator(f'td[aria-label="{name}"]'))).to_have_count(1, timeout=30_000)
            glb_link = rows.filter(has=page.locator('td[aria-label="mesh.glb"]')).locator("a")
            with page.expect_download(timeout=30_000) as download_info:
                glb_link.click()
            glb = tmp_path / "mesh.glb"
            download_info.value.save_as(glb)
            mesh = trimesh.load(glb, force="mesh")
            assert len(mesh.faces) > 0 and len(mesh.vertices) > 0

            page.wait_for_timeout(500)  # let the viewer draw a frame
            page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "screenshot.png").stat().st_size > 10_000
    if not SCREENSHOT.exists() or os.environ.get("T2MV_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "screenshot.png", SCREENSHOT)
    assert not failed, failed  # no missing assets (e.g. font files) on our own server
    # No fonts, analytics or telemetry from outside; gradio 5.14's page only asks cdnjs for iframeResizer,
    # which is optional (it sizes the app inside an iframe).
    assert {urlparse(url).hostname for url in outside} <= {"cdnjs.cloudflare.com"}, outside


def test_pick_a_second_candidate_and_make_3d_from_it(app_url, page):
    """Best of N in the browser: two candidates in the gallery, a click on the second, "Make 3D" runs from it."""
    from playwright.sync_api import expect

    page.goto(app_url, wait_until="domcontentloaded")
    expect(page.get_by_text("SMOKE MODE")).to_be_visible(timeout=30_000)
    page.get_by_label("Prompt", exact=True).fill("a red teapot")
    page.get_by_text("Settings", exact=True).click()
    count = page.get_by_label("number input for Candidate images")
    count.fill("2")
    count.press("Enter")
    page.locator("#generate").click()
    gallery = page.locator("#candidates")
    expect(gallery.locator("img")).to_have_count(2, timeout=180_000)
    expect(page.locator("#status")).to_contain_text("Done", timeout=180_000)
    expect(gallery).to_contain_text(re.compile(r"0 · score [0-9.]+ · chosen"))  # noise scores tie: the first
    gallery.locator("img").nth(1).click()
    page.locator("#make-3d").click()
    # The second candidate is marked chosen once the 3D stages ran from it.
    expect(gallery).to_contain_text(re.compile(r"1 · score [0-9.]+ · chosen"), timeout=180_000)
    expect(gallery).not_to_contain_text(re.compile(r"0 · score [0-9.]+ · chosen"))
    expect(page.locator("#status")).to_contain_text("Done", timeout=30_000)
    expect(page.locator("#viewer canvas")).to_be_visible(timeout=30_000)
