"""The playground page (GET /) in a real headless Chromium (Debian's `chromium` + `chromium-driver`, which .ci/run
installs), driven by selenium against the real stack: it loads nothing from outside the gateway, says the weights are
random, synthesizes with a registered voice, an uploaded prompt and a (fake) microphone recording, and shows that
audio bytes arrived and played through Web Audio with the latency and per-stage timings on screen. A gateway with an
API key and CORS on: the page asks for the key, and a cross-origin preflight is answered without one.

`PLAYGROUND_SCREENSHOT=docs/images/playground.png` also saves the page after a synthesis there (make screenshot)."""
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from cosyvoice_common.constants import SAMPLES_PER_TOKEN, TOKEN_FRAME_RATE_HZ
from cosyvoice_gateway.testing import HOST, free_port, gateway_process, prompt_wav_bytes, register_http_voice

pytestmark = [pytest.mark.stack, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1180",
                 "--autoplay-policy=no-user-gesture-required",                  # AudioContext runs without a click
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream")   # a beeping microphone
TOKENS = 60                  # forced length: 2.4 s of audio in 3 chunks (first chunk, one hop, final)
PCM16_BYTES = 2
WAIT_S = 120.0               # a synthesis on a loaded 2-core CPU machine
API_KEY = "playground-test-key"
CROSS_ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def http_url(stack_http_url) -> str:
    return stack_http_url


@pytest.fixture(scope="module")
def voice(http_url) -> str:
    return register_http_voice(http_url, f"page-{uuid.uuid4().hex[:8]}", seed=21)["id"]


def _state(driver) -> dict:
    return driver.execute_script("return window.playground")


def _wait(driver, done, what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        state = _state(driver)
        if done(state):
            return state
        assert not state.get("error"), state["error"]
        assert time.monotonic() < deadline, f"{what}: {state}"
        time.sleep(0.1)


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(driver, lambda s: s and s.get("ready"), "page never loaded its model and voices")


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _speak_and_wait(driver) -> dict:
    driver.find_element(By.ID, "speak").click()
    return _wait(driver, lambda s: s["phase"] in ("played", "failed"), "synthesis never finished playing")


def _assert_streamed_and_played(driver, state: dict) -> None:
    assert state["phase"] == "played" and state["contextState"] == "running", state
    assert state["bytesReceived"] == TOKENS * SAMPLES_PER_TOKEN * PCM16_BYTES
    assert state["chunks"] >= 3                                   # played chunk by chunk as they arrived
    assert state["endedSources"] == state["scheduledSources"] == state["chunks"]
    assert abs(state["playedSeconds"] - TOKENS / TOKEN_FRAME_RATE_HZ) < 1e-3
    assert 0 < state["firstAudioMs"] and state["timings"]["speech_tokens"] == TOKENS
    assert driver.find_element(By.ID, "m-first").text.endswith("ms")          # the latency is on screen
    assert driver.find_element(By.ID, "m-server-first").text.endswith("ms")
    assert float(driver.find_element(By.ID, "m-rtf").text) > 0
    rows = driver.find_elements(By.CSS_SELECTOR, "#stages tbody tr")
    assert [r.find_element(By.TAG_NAME, "td").text for r in rows][:4] == ["tokenizer", "speaker", "llm", "token2wav"]


def test_playground_streams_and_plays_with_a_voice_an_upload_and_the_microphone(browser, http_url, voice, tmp_path):
    _open(browser, f"{http_url}/")
    notice = browser.find_element(By.ID, "model-notice")
    assert notice.is_displayed() and "RANDOM WEIGHTS" in notice.text
    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    _set(browser, "max-tokens", str(TOKENS))
    _set(browser, "seed", "5")
    browser.find_element(By.CSS_SELECTOR, f"#voice option[value='{voice}']").click()
    _assert_streamed_and_played(browser, _speak_and_wait(browser))
    # everything the page loaded came from the gateway itself: it works without the internet
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert loaded and all(name.startswith(http_url) for name in loaded), loaded
    screenshot = os.environ.get("PLAYGROUND_SCREENSHOT")
    if screenshot:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(screenshot)

    upload = tmp_path / "upload.wav"
    upload.write_bytes(prompt_wav_bytes(seconds=3.0, seed=22))
    browser.find_element(By.ID, "prompt-file").send_keys(str(upload))
    _wait(browser, lambda s: s["promptBytes"] > 0, "the upload was never decoded")
    assert browser.find_element(By.ID, "prompt-state").text.startswith("Uploaded upload.wav: 3.0 s")
    _set(browser, "prompt-text", "A prompt I uploaded.")
    _assert_streamed_and_played(browser, _speak_and_wait(browser))

    record = browser.find_element(By.ID, "record")
    record.click()
    time.sleep(2.5)                               # Chromium's fake microphone: a beep
    record.click()
    _wait(browser, lambda s: "Recorded" in browser.find_element(By.ID, "prompt-state").text, "no recording")
    assert browser.find_element(By.ID, "voice").get_attribute("value") == ""     # the prompt, not a voice
    _assert_streamed_and_played(browser, _speak_and_wait(browser))


@pytest.fixture(scope="module")
def keyed_gateway(stage_servers, redis_server, tiny_model_dir, tmp_path_factory):
    http_port = free_port()
    env = {**os.environ, **stage_servers.urls_env(), "REDIS_URL": redis_server.url, "MODEL_DIR": str(tiny_model_dir),
           "GRPC_PORT": str(free_port()), "HTTP_PORT": str(http_port), "READINESS_INTERVAL_S": "0.5",
           "COSYVOICE_API_KEY": API_KEY, "CORS_ALLOW_ORIGINS": CROSS_ORIGIN}
    url = f"http://{HOST}:{http_port}"
    with gateway_process(env, tmp_path_factory.mktemp("keyed") / "gateway.log", f"{url}/readyz"):
        yield url


def test_with_auth_on_the_page_asks_for_the_key_and_then_lists_voices(browser, keyed_gateway):
    _open(browser, f"{keyed_gateway}/")
    assert browser.find_element(By.ID, "key-row").is_displayed()
    assert "API key" in browser.find_element(By.ID, "status").text
    assert browser.execute_script("return document.getElementById('voice').options.length") == 1
    _set(browser, "api-key", API_KEY)
    browser.find_element(By.ID, "text").click()                   # leaving the field: the page retries with it
    _wait(browser, lambda s: browser.execute_script("return document.getElementById('voice').options.length") > 1,
          "voices never listed with the key")


def test_cors_is_off_by_default_and_a_configured_origin_gets_its_preflight(http_url, keyed_gateway):
    preflight = {"Origin": CROSS_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx.options(f"{keyed_gateway}/v1/audio/speech", headers=preflight)
    assert allowed.status_code == 200                               # answered before the key check
    assert allowed.headers["access-control-allow-origin"] == CROSS_ORIGIN
    listed = httpx.get(f"{keyed_gateway}/v1/models", headers={"Origin": CROSS_ORIGIN,
                                                             "Authorization": f"Bearer {API_KEY}"})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == CROSS_ORIGIN
    other = httpx.options(f"{keyed_gateway}/v1/audio/speech", headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    off = httpx.get(f"{http_url}/v1/models", headers={"Origin": CROSS_ORIGIN})
    assert off.status_code == 200 and "access-control-allow-origin" not in off.headers
