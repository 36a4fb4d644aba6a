"""The playground at / in a real headless browser: Debian's `chromium` + `chromium-driver` (the system browser,
nothing downloaded), driven by selenium. Load the page (with the shared server's API key), generate an image and
check the <img> holds a PNG equal to `Engine.generate_image`'s with the same seed and settings, send a chat
message and watch the reply arrive in pieces (streamed) and end as `Engine.chat`'s greedy text.

CI installs the browser (.ci/run: apt-get install chromium chromium-driver); without it this test skips."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from blip3o_engine import ImageParams, SamplingParams
from _serve_util import API_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver); .ci/run installs them")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the [dev] extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 120  # a busy 2-core machine; each wait ends as soon as its condition holds
# Records every text the streaming reply bubble shows, so that the test can see it grow piece by piece.
RECORD_REPLY_TEXTS = """
window.replyTexts = [];
new MutationObserver(() => {
  const bubble = document.querySelector('.bubble.assistant .text');
  if (bubble && bubble.textContent) window.replyTexts.push(bubble.textContent);
}).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def set_field(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def test_playground_generates_an_image_and_streams_a_chat(server, browser, oracle):
    wait = WebDriverWait(browser, WAIT_S)
    browser.get(server.url + "/")
    assert browser.title == "blip3o-engine playground"
    set_field(browser, "api-key", API_KEY)
    browser.find_element(By.ID, "api-key").send_keys(Keys.TAB)  # "change" -> lists the models with the key
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == "model: tiny")

    # Image: seed, steps and guidance from the form; previews and a progress bar fed by the stream.
    browser.find_element(By.ID, "tab-image").click()
    settings = {"image-seed": 7, "image-steps": 4, "image-guidance": 2, "image-dit-steps": 3,
                "image-dit-guidance": 1.5, "image-partials": 1}
    for element_id, value in settings.items():
        set_field(browser, element_id, value)
    browser.find_element(By.ID, "image-generate").click()
    img = browser.find_element(By.ID, "image-result")
    wait.until(lambda d: img.get_attribute("data-final") == "true")
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    png = base64.b64decode(src.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    want = oracle.generate_image("a red apple on a wooden table", ImageParams(
        seed=7, decoder_steps=4, decoder_guidance=2.0, dit_steps=3, dit_guidance=1.5)).image
    assert np.abs(shown - np.asarray(want, dtype=np.int16)).max() <= 1  # test_images_api.py: GEMM rounding only
    progress = browser.find_element(By.ID, "image-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max")
    assert browser.find_element(By.ID, "image-caption").text == "64x64, seed 7"

    # Chat: Enter sends; the reply streams into its bubble and ends as Engine.chat's greedy text.
    browser.find_element(By.ID, "tab-chat").click()
    set_field(browser, "chat-max-tokens", 48)
    browser.execute_script(RECORD_REPLY_TEXTS)
    set_field(browser, "chat-input", "Describe a red apple.")
    browser.find_element(By.ID, "chat-input").send_keys(Keys.ENTER)
    done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".bubble.assistant.done"))[0]
    reply = done.find_element(By.CSS_SELECTOR, ".text").text
    want_text = oracle.chat([{"role": "user", "content": "Describe a red apple."}],
                            SamplingParams(max_tokens=48, temperature=0.0)).text
    assert reply == want_text.strip()  # .text is the rendered text: leading/trailing whitespace collapses
    seen = browser.execute_script("return window.replyTexts")
    assert len(set(seen)) >= 2 and all(want_text.startswith(t) for t in seen), seen  # it grew piece by piece
    assert browser.find_element(By.ID, "error").get_attribute("class") == "hidden"
