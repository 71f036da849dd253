"""The search page (embedserve.page) on a real server with an API key set: the page, its assets
and /docs answered without the key, and the page driven in a real headless Chromium (Debian's
`chromium` and `chromium-driver`, which `make test` installs where they are missing): the key
asked for, a photo uploaded through the file input, k thumbnails, "more like this", the label
filter, the k selector, a server error shown; with UPDATE_SCREENSHOTS=1, the screenshot in
docs/images/search-page.png rewritten.

The index is built with the command line from procedurally drawn scenes, one folder per label.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.embedserve.server import REPO, build_index, running

pytestmark = pytest.mark.slow

KEY = "search-page-test-key-0123456789"
LABELS = ("forest", "night", "sea", "sunset")
PER_LABEL = 12
K = 10  # the page's default k
SCREENSHOT = REPO / "docs" / "images" / "search-page.png"
ASSETS = ("/page/app.js", "/page/api.js", "/page/style.css", "/page/icon.svg")


# -- procedurally drawn scenes ----------------------------------------------------------------


def scene(label: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A uint8 HxWx3 picture whose kind shows: a sunset, a forest, the sea or a night sky."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    horizon = rng.uniform(0.55, 0.75)
    if label == "sunset":
        t = np.clip(y / horizon, 0, 1)[..., None]
        img[:] = (1 - t) * [0.35, 0.15, 0.45] + t * [1.0, 0.55, 0.2]
        sx, r = rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.14)
        img[(x - sx) ** 2 + (y - horizon) ** 2 < r**2] = [1.0, 0.9, 0.45]
        img[y > horizon] = [0.18, 0.08, 0.12]
    elif label == "forest":
        img[:] = [0.65, 0.8, 0.95]
        img[y > 0.2] = [0.15, 0.4, 0.18]
        for _ in range(rng.integers(5, 9)):
            cx, w = rng.uniform(0, 1), rng.uniform(0.03, 0.06)
            img[(np.abs(x - cx) < w) & (y > 0.35)] = [0.3, 0.2, 0.1]
            img[(np.abs(x - cx) < (y - 0.1) * 0.35) & (y > 0.1) & (y < 0.55)] = [0.1, 0.3, 0.12]
    elif label == "sea":
        sky = rng.uniform(0.3, 0.45)
        img[:] = [0.7, 0.85, 1.0]
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (y * rng.uniform(8, 14) + 0.3 * np.sin(6 * x)))
        sea = np.stack([0.05 + 0.1 * wave, 0.3 + 0.15 * wave, 0.6 + 0.2 * wave], -1)
        img[y > sky] = sea[y > sky]
    else:  # night
        t = y[..., None]
        img[:] = (1 - t) * [0.02, 0.03, 0.12] + t * [0.08, 0.1, 0.25]
        stars = rng.random((size, size)) > 0.992
        img[stars] = [1.0, 1.0, 0.9]
        mx, my = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.4)
        img[(x - mx) ** 2 + (y - my) ** 2 < 0.01] = [0.95, 0.95, 0.8]
        img[y > horizon + 0.1] = [0.01, 0.02, 0.05]
    img *= rng.uniform(0.85, 1.15)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """An index (built with `embedserve index build`, thumbnails included) of PER_LABEL scenes
    per label, in a folder per label."""
    root = tmp_path_factory.mktemp("search-page")
    rng = np.random.default_rng(37)
    for label in LABELS:
        folder = root / "photos" / label
        folder.mkdir(parents=True)
        for i in range(PER_LABEL):
            Image.fromarray(scene(label, rng)).save(folder / f"{i:03d}.png")
    return build_index(root / "photos", root / "index")


@pytest.fixture(scope="module")
def server(index_dir, tmp_path_factory):
    env = {"EMBEDSERVE_INDEX": str(index_dir), "EMBEDSERVE_API_KEY": KEY}
    with running(env, tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv


@pytest.fixture
def query_photo(tmp_path) -> Path:
    """A sunset that is not in the index."""
    path = tmp_path / "my sunset.jpg"
    path.write_bytes(jpeg(scene("sunset", np.random.default_rng(2026))))
    return path


# -- without a browser --------------------------------------------------------------------------


def test_the_page_and_its_assets_answer_without_the_key(server):
    for path in ("/", *ASSETS):
        response = httpx.get(server.url + path, timeout=10)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["cache-control"] == "no-cache"
    # ... while the data stays behind the key
    for path in ("/info", "/index/labels"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401, path
    headers = {"Authorization": f"Bearer {KEY}"}
    labels = httpx.get(server.url + "/index/labels", headers=headers, timeout=10).json()
    assert labels == {"labels": dict.fromkeys(LABELS, PER_LABEL)}


def test_the_html_holds_the_file_input_and_loads_nothing_from_elsewhere(server):
    response = httpx.get(server.url + "/", timeout=10)
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert '<input type="file"' in html
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    for path in ("/", "/docs", *ASSETS):
        text = httpx.get(server.url + path, timeout=10).text
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", text), path
        assert "googletagmanager" not in text, path


def test_docs_serves_the_openapi_page_and_its_assets(server):
    response = httpx.get(server.url + "/docs", timeout=10)
    assert response.status_code == 200
    assert 'id="swagger-ui"' in response.text
    assets = re.findall(r'(?:src|href)="(static_content/[^"]+)"', response.text)
    assert len(assets) >= 4
    for asset in assets:
        assert httpx.get(f"{server.url}/{asset}", timeout=10).status_code == 200, asset
    spec = httpx.get(server.url + "/docs.json", timeout=10).json()  # what Swagger UI loads
    assert "/search" in spec["paths"]
    assert "/" not in spec["paths"] and "/docs" not in spec["paths"]
    assert not any(p.startswith("/page/") for p in spec["paths"])


# -- in Chromium ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver (Debian's packages), or a skip saying why."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed, and `make test` could "
            "not install them here (apt-get install chromium chromium-driver, as root)"
        )
    from selenium import webdriver  # the dev extra: a missing one is an error, not a skip
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # as root (CI containers), Chromium runs only without its sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,800",
        "--force-device-scale-factor=1",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console
    drv = webdriver.Chrome(options=options, service=Service(driver))
    drv.set_script_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


CARDS = """
return [...document.querySelectorAll('#results li')].map((li) => {
  const img = li.querySelector('img');
  return {id: Number(li.dataset.id), label: li.dataset.label, path: li.dataset.path,
          text: li.innerText, loaded: img.complete && img.naturalWidth > 0};
});
"""
CLEAR = "document.getElementById('results').replaceChildren()"  # to see the next answer come
IDLE = "return !document.getElementById('results').hasAttribute('aria-busy')"


def wait(drv, condition, timeout: float = 60, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(condition, what)


def cards(drv) -> list[dict]:
    return drv.execute_script(CARDS)


def settled(drv, check) -> list[dict] | None:
    """The cards once no search is in flight, every thumbnail loaded and `check(cards)` holds."""
    if not drv.execute_script(IDLE):
        return None
    now = cards(drv)
    return now if now and all(c["loaded"] for c in now) and check(now) else None


def direct_search(server, **fields) -> list[dict]:
    headers = {"Authorization": f"Bearer {KEY}"}
    files = fields.pop("files", None)
    response = httpx.post(
        server.url + "/search", data=fields, files=files, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["neighbours"]


def test_searching_in_the_browser(browser, server, query_photo, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    drv = browser
    drv.get(server.url + "/")
    find = drv.find_element

    # the server answers 401: the page asks for the key; a wrong one is refused with the reason
    wait(drv, lambda d: find(By.ID, "key-dialog").is_displayed(), what="the key dialog")
    find(By.ID, "key-input").send_keys("not-the-key-0123456789")
    find(By.ID, "key-ok").click()
    wait(drv, lambda d: find(By.ID, "key-problem").is_displayed(), what="the key's problem")
    assert "wrong API key" in find(By.ID, "key-problem").text
    find(By.ID, "key-input").send_keys(KEY)
    find(By.ID, "key-ok").click()
    wait(drv, lambda d: not find(By.ID, "key-dialog").is_displayed())
    assert drv.execute_script("return sessionStorage.getItem('embedserve.apiKey')") == KEY
    boxes = wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#label-list input"))
    assert sorted(b.get_attribute("value") for b in boxes) == sorted(LABELS)
    assert f"{len(LABELS) * PER_LABEL} images" in find(By.ID, "index-info").text

    # a photo through the file input: k cards with thumbnails, score, label and path
    find(By.CSS_SELECTOR, "input[type=file]").send_keys(str(query_photo))
    first = wait(drv, lambda d: settled(d, lambda c: len(c) == K), what="k results")
    expected = direct_search(server, files=[("images", query_photo.read_bytes())], k=str(K))
    assert [c["id"] for c in first] == [h["id"] for h in expected]
    for card, hit in zip(first, expected, strict=True):
        assert card["label"] == hit["label"] and card["path"] == hit["path"]
        assert f"{hit['score']:.3f}" in card["text"] and hit["label"] in card["text"]
        assert Path(hit["path"]).name in card["text"]
    assert find(By.ID, "query-image").get_attribute("naturalWidth") != "0"
    save_screenshot(drv)

    # one clicked: more like it, without it
    clicked = first[2]
    drv.find_elements(By.CSS_SELECTOR, "#results li button")[2].click()
    before = [c["id"] for c in first]
    more = wait(
        drv,
        lambda d: settled(d, lambda c: [x["id"] for x in c] != before and len(c) == K),
        what="more like this",
    )
    assert clicked["id"] not in [c["id"] for c in more]
    assert [c["id"] for c in more] == [
        h["id"] for h in direct_search(server, id=str(clicked["id"]), k=str(K))
    ]
    assert f"#{clicked['id']}" in find(By.ID, "query-info").text

    # the k selector
    Select(find(By.ID, "k")).select_by_visible_text("5")
    wait(drv, lambda d: settled(d, lambda c: len(c) == 5), what="5 results")
    Select(find(By.ID, "k")).select_by_visible_text(str(K))
    wait(drv, lambda d: settled(d, lambda c: len(c) == K), what="k results again")

    # filtered by a label other than the clicked item's: every result has it, k of them
    label = next(name for name in LABELS if name != clicked["label"])
    find(By.CSS_SELECTOR, f"#label-list input[value='{label}']").click()
    filtered = wait(
        drv,
        lambda d: settled(d, lambda c: all(x["label"] == label for x in c)),
        what=f"results labelled {label}",
    )
    assert len(filtered) == K  # PER_LABEL >= K match: the exact top-k among them
    assert clicked["id"] not in [c["id"] for c in filtered]
    assert [c["id"] for c in filtered] == [
        h["id"] for h in direct_search(server, id=str(clicked["id"]), k=str(K), label=label)
    ]

    # and a second label (the field repeated): every result has one of the two
    other = next(name for name in LABELS if name not in (label, clicked["label"]))
    drv.execute_script(CLEAR)
    find(By.CSS_SELECTOR, f"#label-list input[value='{other}']").click()
    both = wait(drv, lambda d: settled(d, lambda c: len(c) == K), what=f"{label} or {other}")
    assert {c["label"] for c in both} <= {label, other}
    assert [c["id"] for c in both] == [
        h["id"]
        for h in direct_search(server, id=str(clicked["id"]), k=str(K), label=[label, other])
    ]

    # the filter cleared: more like the clicked item again, every label
    find(By.ID, "clear-labels").click()
    wait(drv, lambda d: settled(d, lambda c: [x["id"] for x in c] == [y["id"] for y in more]))

    # a file the server refuses: its 4xx message is shown
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    find(By.CSS_SELECTOR, "input[type=file]").send_keys(str(bad))
    wait(drv, lambda d: find(By.ID, "error").is_displayed(), what="the error")
    assert find(By.ID, "error").text.startswith("400: ")
    assert len(find(By.ID, "error").text) > len("400: ") + 10

    # a photo pasted, then one dropped: each searched (the same photo: the same results)
    for kind in ("paste", "drop"):
        drv.execute_script(CLEAR)
        assert drv.execute_async_script(DISPATCH, kind, jpeg_base64(query_photo)) is True
        wait(drv, lambda d, kind=kind: find(By.ID, "query-info").text == f"Query: {kind}.jpg")
        now = wait(drv, lambda d: settled(d, lambda c: len(c) == K), what=f"{kind} results")
        assert [x["id"] for x in now] == [x["id"] for x in first]
        assert not find(By.ID, "error").is_displayed()

    # no script error and no blocked resource (the Content-Security-Policy) on the way; the
    # refused calls (401, 400) are logged by the browser as failed loads
    console = [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    assert not [m for m in console if "Failed to load resource" not in m], console

    # the OpenAPI page, moved to /docs, renders the API
    drv.get(server.url + "/docs")
    wait(drv, lambda d: "/search" in find(By.ID, "swagger-ui").text, what="Swagger UI")


# A File made of base64 bytes, pasted on the page or dropped on its drop area, as a browser
# does (selenium cannot reach the system clipboard or drag a file from the desktop).
DISPATCH = """
const [kind, data, done] = arguments;
const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], `${kind}.jpg`, {type: 'image/jpeg'}));
const init = {bubbles: true, cancelable: true};
const event = kind === 'paste'
  ? new ClipboardEvent('paste', {...init, clipboardData: transfer})
  : new DragEvent('drop', {...init, dataTransfer: transfer});
(kind === 'paste' ? document.body : document.getElementById('drop')).dispatchEvent(event);
done(event.defaultPrevented);
"""


def jpeg_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def save_screenshot(drv) -> None:
    """The page as it is, reduced to a palette PNG (~100 KB) for the docs: written only with
    UPDATE_SCREENSHOTS=1, so that a test run leaves the repository as it found it."""
    if os.environ.get("UPDATE_SCREENSHOTS") != "1":
        return
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    drv.execute_script("window.scrollTo(0, 0); document.activeElement?.blur()")
    ActionChains(drv).move_to_element(drv.find_element(By.ID, "status")).perform()  # no hover
    time.sleep(0.3)  # the hover's transition
    shot = Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shot.quantize(colors=96, dither=Image.Dither.NONE).save(SCREENSHOT, optimize=True)
