"""End-to-end test of the preview app in a real browser: `python -m app` on a free localhost port, driven by
Playwright with the system's Chromium (Debian package `chromium`, found on PATH; never downloaded).

    /work/venv/bin/pytest tests/test_app_e2e.py -q
    NVILA_FT_UPDATE_SCREENSHOT=1 pytest tests/test_app_e2e.py     # also refresh docs/app-screenshot.png

The screenshot is written to $NVILA_FT_ARTIFACTS (default `test-artifacts/`) as `app-screenshot.png`.
Skips, saying why, only when no chromium binary is on PATH (.ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VQA_RAD_IMAGE = ROOT.parent / "shared" / "data" / "vqa_rad" / "images" / "synpic100176.jpg"  # 1024 x 1024 chest X-ray
QUESTION = "Is there an abnormality in the lungs?"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: install Debian's chromium package (apt-get install chromium) "
    "to run the browser test; .ci/run does")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_runs, tmp_path_factory):
    """The app as a user starts it, from the repository root, on the tiny runs; stopped after the module."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app-server") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--runs-dir", str(tiny_runs.runs), "--port", str(port),
                                 "--max-upload-mb", "5"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer on {url} within 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _answer(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").input_value().strip()


def test_upload_ask_and_compare_in_a_browser(server, tiny_runs):
    from playwright.sync_api import expect, sync_playwright  # the dev extra

    url, log_path = server
    image = VQA_RAD_IMAGE if VQA_RAD_IMAGE.is_file() else tiny_runs.data / "images" / "examples_palette.png"
    artifacts = Path(os.environ.get("NVILA_FT_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "app-screenshot.png"
    shot.unlink(missing_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            # The first run of the base is selected; its recipe and metrics are shown.
            expect(page.locator("#runs")).to_contain_text("medical")
            expect(page.locator("#run-details")).to_contain_text("metrics.json", timeout=30_000)

            # One click on an example of the run's eval split loads its image, question and reference answer.
            page.locator("#examples tbody tr").first.click()
            expect(page.locator("#question textarea")).not_to_have_value("", timeout=30_000)
            expect(page.locator("#image-preview img")).to_be_visible()
            assert _answer(page, "reference")

            # A real radiology image and our own question.
            page.locator("#media-input button[aria-label='Clear']").click()
            page.locator("#media-input input[type=file]").set_input_files(str(image))
            expect(page.locator("#reference textarea")).to_have_value("", timeout=30_000)  # not the example's
            expect(page.locator("#image-preview img")).to_be_visible()
            page.locator("#question textarea").fill(QUESTION)
            page.locator("#ask").click()

            page.wait_for_function(
                "() => ['answer-base', 'answer-run-0'].every(id => "
                "(document.querySelector(`#${id} textarea`) || {}).value?.trim())", timeout=120_000)
            expect(page.locator("#status")).to_contain_text("Done", timeout=120_000)
            base, tuned = _answer(page, "answer-base"), _answer(page, "answer-run-0")
            assert base and tuned
            expect(page.locator("#answer-run-0")).to_contain_text("Tuned: medical")
            expect(page.locator("#tile-info")).to_contain_text("visual tokens")
            tiles = page.locator("#tiles img")
            assert tiles.count() >= 1
            assert page.locator("#tiles").inner_text().count("thumbnail") == 1  # dynamic tiling of the run
            page.screenshot(path=str(shot), full_page=True)

            # A file that is not an image is refused at upload, with a message saying so.
            not_image = artifacts / "not-an-image.gif"
            not_image.write_bytes(b"GIF89a, but no image data")
            page.locator("#media-input button[aria-label='Clear']").click()
            page.locator("#media-input input[type=file]").set_input_files(str(not_image))
            expect(page.locator(".toast-body").first).to_contain_text("does not open as an image", timeout=30_000)
            expect(page.locator("#media-input input[type=file]")).to_have_count(1)  # and removed again
        finally:
            browser.close()

    assert shot.stat().st_size > 10_000
    log = log_path.read_text()
    assert f"app: {url.rstrip('/')}" in log and "share=True" not in log  # bound to 127.0.0.1, no share hint
    assert "gradio.live" not in log
    if os.environ.get("NVILA_FT_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "app-screenshot.png")
