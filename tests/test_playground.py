"""The playground page of `vsteer serve` in a real headless browser (Debian's chromium + chromedriver, via Selenium).

A real `vsteer serve` process of the embedded SmolLM2 with an API key, one value-site persona
vector extracted from shipped data (repeng's happy vs sad templates) and one value-only LoRA
adapter. The browser types the key and a prompt, picks the adapter, the vector and a scale, and
runs; the streamed text of each pane must equal what the OpenAI API answers for the same request
at temperature 0. A screenshot goes to reports/playground.png (a CI artefact).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_serve import _free_port, _http

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
KEY = "playground-key"
ADAPTER, VECTOR, SCALE, POSITIONS = "kind-v", "happy", 8.0, "all"
PROMPT = "Tell me about your weekend."
MAX_TOKENS = 12
WAIT = 180  # seconds: a bounded wait for one generation on 2 shared CPU cores


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A `vsteer serve` process of the embedded model on a free port: {url, client}."""
    from peft import LoraConfig, get_peft_model

    from vsteer.extraction import extract, template_pairs
    from vsteer.models import load_model

    root = tmp_path_factory.mktemp("playground")
    (root / "vectors").mkdir()
    model, tok = load_model(MODEL, device="cpu")
    vec = extract(model, tok, template_pairs("happy", "sad", limit=32), site="v", layers="8-20")
    vec.save(root / "vectors" / f"{VECTOR}.safetensors")
    torch.manual_seed(0)
    arm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    with torch.no_grad():  # PEFT starts B at zero: make the adapter change the answers
        for n, p in arm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    arm.save_pretrained(root / "adapters" / ADAPTER)
    del model, arm
    port = _free_port()
    cmd = [sys.executable, "-m", "vsteer.cli", "serve", "--model", MODEL, "--device", "cpu"]
    cmd += ["--vectors", str(root / "vectors"), "--adapters", str(root / "adapters")]
    cmd += ["--port", str(port), "--api-key", KEY]
    log = open(root / "serve.log", "w+")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # bounded wait (120 s) for the model to load and the port to open
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"vsteer serve exited: {log.read()[-2000:]}")
            try:
                if _http(url + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("vsteer serve did not answer /health within 120 s")
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT)
        yield {"url": url, "client": client}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make install installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium  # both paths given: Selenium Manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1300,900")
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


def _open(browser, server):
    """Load the page, give it the API key and wait until it lists the models and vectors."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server["url"] + "/")
    key = browser.find_element("id", "key")
    key.send_keys(KEY, Keys.TAB)  # the page reloads its lists when the key changes
    WebDriverWait(browser, 30).until(
        lambda d: len(_options(d, "model")) == 2 and _options(d, "vector") == [VECTOR]
    )


def _options(browser, select_id: str) -> list[str]:
    return [o.get_attribute("value") for o in browser.find_elements("css selector", f"#{select_id} option")]


def _fill(browser, **fields):
    from selenium.webdriver.support.ui import Select

    for name, value in fields.items():
        el = browser.find_element("id", name)
        if el.tag_name == "select":
            Select(el).select_by_visible_text(value)  # the label a user sees, not only the value
        else:
            el.clear()
            el.send_keys(str(value))


def _run(browser):
    """Click Generate and wait until both panes have finished or the page shows an error."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element("id", "run").click()
    WebDriverWait(browser, WAIT).until(
        lambda d: (
            d.find_element("id", "run").is_enabled()
            and (_text(d, "error") or all(_done(d, p) for p in ("plain", "steered")))
        )
    )


def _text(browser, element_id: str) -> str:
    return browser.find_element("id", element_id).get_property("textContent")


def _done(browser, element_id: str) -> bool:
    return browser.find_element("id", element_id).get_attribute("data-done") == "1"


def _api(server, steering=None):
    r = server["client"].chat.completions.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"steering": steering} if steering else None,
    )
    return r.choices[0].message.content, r.model_extra["vsteer"]["fingerprint"]


def test_playground_streams_what_the_api_answers(server, browser):
    _open(browser, server)
    assert _options(browser, "model") == [MODEL, ADAPTER]
    _fill(
        browser,
        model=f"{ADAPTER} (adapter)",
        vector=VECTOR,
        scale=SCALE,
        positions=POSITIONS,
        max_tokens=MAX_TOKENS,
        prompt=PROMPT,
    )
    _run(browser)
    (ROOT / "reports").mkdir(exist_ok=True)
    browser.save_screenshot(str(ROOT / "reports" / "playground.png"))
    assert _text(browser, "error") == ""
    plain, steered = _text(browser, "plain"), _text(browser, "steered")
    api_plain, fp_plain = _api(server)
    api_steered, fp_steered = _api(server, [{"vector": VECTOR, "scale": SCALE, "positions": POSITIONS}])
    assert plain and steered and plain != steered, (plain, steered)
    assert (plain, steered) == (api_plain, api_steered)
    # the meta line under each pane shows the fingerprint of what the server applied
    assert fp_plain in _text(browser, "plain-meta") and fp_steered in _text(browser, "steered-meta")
    assert fp_plain != fp_steered


def test_playground_key_typed_then_generate_at_once(server, browser):
    """A user who types the key and clicks Generate straight away gets answers, not an error."""
    browser.get(server["url"] + "/")
    _fill(browser, max_tokens=2, prompt=PROMPT)
    browser.find_element("id", "key").send_keys(KEY)
    _run(browser)  # the click blurs the key field: its change event and the click race
    assert _text(browser, "error") == ""
    assert _text(browser, "plain") and _text(browser, "steered")


def test_playground_shows_one_clear_error_for_a_bad_scale(server, browser):
    _open(browser, server)
    _fill(browser, model=f"{ADAPTER} (adapter)", vector=VECTOR, scale=1000, max_tokens=2, prompt=PROMPT)
    _run(browser)
    error = _text(browser, "error")
    assert error == "steered: steering[0].scale 1000 is out of range [-100, 100]", error
    assert _text(browser, "steered") == ""
    # the unsteered request was fine: it still streams its answer, with no second message
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT).until(lambda d: _done(d, "plain"))
    assert _text(browser, "plain") == _api(server)[0][: len(_text(browser, "plain"))] != ""
    assert _text(browser, "error") == error
