"""The storefront and the console in a real browser (Debian's headless Chromium driven by
Selenium) against the real Serve application, deployed with API keys on (the default outside
the quickstart): the storefront acts as the server-side key named ``shop``, the console takes
an admin key once and keeps a session cookie.

- buying an item on /shop (with the keyboard alone) changes the recommendation list;
- promoting a version in the console moves the alias (reason and actor recorded) and the
  storefront then shows the new version;
- a reader key cannot open the console, and a form without the session's CSRF token is refused.

Screenshots of both pages go to ``$AIPLATFORM_SCREENSHOTS`` when set (``docs/images`` for the
README), else to the test's temporary folder.
"""

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from aiplatform.data import lake
from aiplatform.experiments.config import Experiment
from aiplatform.experiments.store import ExperimentStore
from aiplatform.registry import ModelRegistry
from aiplatform.security.keys import KeyStore, Role
from aiplatform.serving.app import build_app, start, stop
from tests.integration.test_rollout import N_ITEMS, _free_port, make_root

pytestmark = pytest.mark.integration

APP = "aiplatform-pages"
PREFIX = "/pages"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CATEGORIES = ["shoes", "books", "garden", "kitchen", "toys"]

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver, "
                "or `make chromium`)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Versions 1 and 2 indexed, champion -> v1, users u0..u39 with history, and a catalogue
    with titles, categories and prices in the lake."""
    layout = make_root(tmp_path_factory.mktemp("pages"))
    lake.write_tables(layout, {"items": pa.table({
        "item_id": [f"item_{i:03d}" for i in range(N_ITEMS)],
        "title": [f"{CATEGORIES[i % 5].capitalize()} no. {i}" for i in range(N_ITEMS)],
        "category": [CATEGORIES[i % 5] for i in range(N_ITEMS)],
        "price": [round(5.0 + i * 1.5, 2) for i in range(N_ITEMS)]})})
    return layout


@pytest.fixture(scope="module")
def keys(home):
    store = KeyStore(home.root, env="")
    made = {name: store.create(name, role, created_by="test")[0]
            for name, role in (("ops-admin", Role.admin), ("analyst", Role.reader))}
    store.create("shop", Role.writer, created_by="test")  # the storefront acts as it; its value is never used
    return made


@pytest.fixture(scope="module")
def base_url(ray_session, home, keys):
    url = start(build_app(home.root, alias_poll_s=0.5), host="127.0.0.1", port=_free_port(), name=APP,
                route_prefix=PREFIX)
    yield url
    stop(APP)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("AIPLATFORM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _chromium(width: int = 1280, height: int = 1000):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture()
def browser():
    driver = _chromium()
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _items(driver) -> list[str]:
    return [li.get_attribute("data-item-id") for li in driver.find_elements(By.CSS_SELECTOR, "#recommendations li.rec")]


def _wait(predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _sign_in(driver, base_url: str, key: str) -> None:
    driver.get(f"{base_url}/console/signin")
    field = driver.find_element(By.ID, "key")
    field.send_keys(key)
    field.send_keys(Keys.ENTER)


def test_buying_an_item_changes_the_recommendations(base_url, browser, shots):
    browser.get(f"{base_url}/shop")
    assert browser.find_element(By.ID, "fallback").text == "popular"  # a guest has no history yet
    field = browser.find_element(By.ID, "user")
    field.send_keys("u1")
    field.send_keys(Keys.ENTER)
    _wait(lambda: "u1" in browser.find_element(By.TAG_NAME, "h1").text, "the list of u1")
    before = _items(browser)
    assert len(before) == 12
    first = browser.find_element(By.CSS_SELECTOR, "#recommendations li.rec")
    title = first.find_element(By.TAG_NAME, "h2").text
    assert title.endswith(f"no. {int(before[0][-3:])}")  # the catalogue's title, not the id
    assert first.find_element(By.CLASS_NAME, "category").text in CATEGORIES
    assert first.find_element(By.CLASS_NAME, "price").text
    assert browser.find_element(By.ID, "variant").text == "champion"
    assert browser.find_element(By.ID, "model-version").text == "v1"
    assert browser.find_element(By.ID, "fallback").text == "none"
    assert browser.find_element(By.ID, "latency").text.endswith(" ms")
    browser.save_screenshot(str(shots / "shop.png"))

    # every visible control is labelled
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')]"
        ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())"
        ".map(e => e.outerHTML)")
    assert unlabelled == []

    # the keyboard alone reaches the first item's Buy button and presses it
    body = browser.find_element(By.TAG_NAME, "body")
    body.click()
    for _ in range(60):
        active = browser.switch_to.active_element
        if active.get_attribute("value") == "purchase":
            break
        active.send_keys(Keys.TAB)
    assert active.get_attribute("value") == "purchase", "Tab never reached a Buy button"
    bought = active.find_element(By.XPATH, "./ancestor::li").get_attribute("data-item-id")
    active.send_keys(Keys.ENTER)
    notice = _wait(lambda: browser.find_elements(By.ID, "done"), "the purchase notice")
    assert notice[0].text.startswith("Bought:")
    after = _items(browser)
    assert after != before and bought not in after  # what was bought is left out at once

    # the item page shows similar items, and its Buy button works too
    browser.find_element(By.CSS_SELECTOR, "#recommendations li.rec h2 a").click()
    _wait(lambda: browser.find_elements(By.ID, "item-title"), "the item page")
    similar = browser.find_elements(By.CSS_SELECTOR, "#similar li")
    assert similar and all(li.get_attribute("data-item-id").startswith("item_") for li in similar)


def test_a_reader_key_cannot_open_the_console(base_url, browser, keys):
    browser.get(f"{base_url}/console/models")
    assert browser.current_url.endswith("/console/signin")
    _sign_in(browser, base_url, keys["analyst"])
    error = _wait(lambda: browser.find_elements(By.ID, "error"), "the refusal")
    assert "role reader" in error[0].text and "admin" in error[0].text
    browser.get(f"{base_url}/console/models")
    assert browser.current_url.endswith("/console/signin")
    _sign_in(browser, base_url, "aip_not-a-key")
    assert "Unknown or revoked" in _wait(lambda: browser.find_elements(By.ID, "error"), "the refusal")[0].text


def test_promoting_in_the_console_changes_what_the_shop_serves(base_url, browser, keys, home, shots):
    _sign_in(browser, base_url, keys["ops-admin"])
    _wait(lambda: browser.current_url.endswith("/console/models"), "the models tab")
    assert keys["ops-admin"] not in browser.page_source
    cookie = next(c for c in browser.get_cookies() if c["name"] == "aip_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain HTTP here
    assert browser.find_element(By.ID, "who").text == "ops-admin (admin)"
    rows = browser.find_elements(By.CSS_SELECTOR, "#versions tbody tr")
    assert [r.get_attribute("data-version") for r in rows] == ["3", "2", "1"]
    assert browser.find_element(By.CSS_SELECTOR, "[data-alias=champion].alias-version").text == "v1"

    # a form posted without the session's CSRF token is refused, even with the session cookie
    with httpx.Client(base_url=base_url, cookies={"aip_console": cookie["value"]}, timeout=30) as client:
        r = client.post("/console/models/two_tower/promote", data={"version": "2", "reason": "x", "confirm": "yes"})
        assert r.status_code == 403 and "CSRF" in r.text
        r = client.post("/console/models/two_tower/promote",
                        data={"version": "2", "reason": "x", "confirm": "yes", "csrf": "0" * 64})
        assert r.status_code == 403
    assert ModelRegistry(home).aliases("two_tower") == {"champion": 1}

    browser.find_element(By.CSS_SELECTOR, "a.promote[data-version='2']").click()
    _wait(lambda: browser.find_elements(By.ID, "reason"), "the confirmation page")
    browser.find_element(By.ID, "reason").send_keys("better offline recall")
    browser.find_element(By.ID, "do-promote").click()  # not confirmed: the browser's required checkbox stops it
    assert not browser.find_elements(By.ID, "done")
    browser.find_element(By.ID, "confirm").click()
    browser.find_element(By.ID, "do-promote").click()
    done = _wait(lambda: browser.find_elements(By.ID, "done"), "the promotion notice")[0].text
    assert "champion of two_tower now points at v2 (was v1)" in done and "api-key:ops-admin" in done
    history = ModelRegistry(home).alias_history("two_tower", "champion")
    assert history[-1]["version"] == 2 and history[-1]["actor"] == "api-key:ops-admin"
    assert history[-1]["reason"] == "better offline recall"
    assert browser.find_element(By.CSS_SELECTOR, "table.history[data-alias=champion] td.reason").text == \
        "better offline recall"

    browser.get(f"{base_url}/console/models/two_tower/2")
    assert "two_tower v2" in browser.find_element(By.TAG_NAME, "h1").text
    for tab in ("experiments", "features", "serving", "jobs"):
        browser.get(f"{base_url}/console/{tab}")
        assert browser.find_element(By.CSS_SELECTOR, ".tabs [aria-current=page]").text.lower() == tab
    assert browser.find_elements(By.ID, "jobs-unavailable")  # this session's Ray has no dashboard
    browser.get(f"{base_url}/console/serving")
    assert int(browser.find_element(By.CSS_SELECTOR, "#deployments tr[data-deployment=RecommendationAPI] "
                                                     "td.replicas").text) >= 1
    # every replica's numbers, from the session Ray's metrics endpoint (not this replica's alone)
    assert browser.find_element(By.ID, "traffic-source").get_attribute("data-source") == "cluster"
    browser.save_screenshot(str(shots / "console-serving.png"))
    browser.get(f"{base_url}/console/features")
    assert browser.find_element(By.CSS_SELECTOR, "#services tr[data-service] td.online-rows").text == "40"
    browser.save_screenshot(str(shots / "console-features.png"))

    def shop_version() -> bool:
        browser.get(f"{base_url}/shop?user=u2")
        return browser.find_element(By.ID, "model-version").text == "v2"

    _wait(shop_version, "the storefront to serve v2")
    browser.get(f"{base_url}/console/models")
    browser.save_screenshot(str(shots / "console.png"))

    # an A/B test with a shadow: its variants, weights, report and shadow overlap on the Experiments tab
    store = ExperimentStore(home)
    store.put(Experiment(name="ab-pages", model_name="two_tower", variants=[
        {"name": "control", "alias": "champion", "weight": 1}, {"name": "older", "version": 1, "weight": 1}],
        shadow={"version": 1, "share": 1.0}), reason="pages test")
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            _wait(lambda: (client.get("/healthz").json().get("experiment") or {}).get("experiment") == "ab-pages",
                  "the replica to route by the experiment")
        for user in ("u4", "u5", "u6", "u7"):
            browser.get(f"{base_url}/shop?user={user}")
        browser.get(f"{base_url}/console/experiments")
        section = browser.find_element(By.CSS_SELECTOR, "section.experiment[data-name=ab-pages]")
        assert "running" in section.find_element(By.TAG_NAME, "h2").text
        variants = [r.text for r in section.find_elements(By.CSS_SELECTOR, "table.variants tbody tr")]
        assert variants == ["control (control) alias champion 1 50.0%", "older v1 1 50.0%"]
        assert section.find_elements(By.CSS_SELECTOR, "table.report")  # rates with intervals per variant

        def overlap() -> bool:
            browser.get(f"{base_url}/console/experiments")
            return bool(browser.find_elements(By.CSS_SELECTOR, "section.experiment[data-name=ab-pages] .overlap"))

        _wait(overlap, "the shadow's overlap")
        browser.save_screenshot(str(shots / "console-experiments.png"))
    finally:
        store.stop("ab-pages", reason="pages test done")

    browser.find_element(By.ID, "signout").click()
    _wait(lambda: browser.current_url.endswith("/console/signin"), "the sign-in page")
    browser.get(f"{base_url}/console/models")
    assert browser.current_url.endswith("/console/signin")


def test_pages_fit_a_phone_screen(base_url):
    driver = _chromium(390, 844)
    try:
        for path in ("/shop?user=u3", "/console/signin"):
            driver.get(f"{base_url}{path}")
            overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (path, overflow)
    finally:
        driver.quit()


def test_the_shop_closes_without_its_key(base_url, home):
    KeyStore(home.root, env="").revoke("shop")
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            _wait(lambda: client.get("/shop").status_code == 403, "the shop to close")
            assert "aiplatform keys create shop --role writer" in client.get("/shop").text
    finally:
        KeyStore(home.root, env="").create("shop", Role.writer)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]{64})"', html).group(1)


def test_with_auth_off_the_pages_are_open_and_forms_still_need_their_token(ray_session, home):
    """The quickstart's mode (auth off on 127.0.0.1): no sign-in, a banner that says so, and the
    shop buys as anyone; a form still needs its session's CSRF token."""
    url = start(build_app(home.root, alias_poll_s=0.5, auth="off", experiments=False), host="127.0.0.1",
                port=_free_port(), name=f"{APP}-open", route_prefix=f"{PREFIX}-open")
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            page = client.get("/console/models")
            assert page.status_code == 200 and "API keys are off" in page.text
            assert client.get("/console/signin", follow_redirects=False).status_code == 303
            shop = client.get("/shop", params={"user": "u9"})
            assert shop.status_code == 200 and 'id="model-version"' in shop.text
            item = re.search(r'data-item-id="(item_\d+)"', shop.text).group(1)
            form = {"user": "u9", "item_id": item, "event_type": "purchase"}
            assert client.post("/shop/events", data=form).status_code == 403  # no token
            done = client.post("/shop/events", data={**form, "csrf": _csrf(shop.text)}, follow_redirects=False)
            assert done.status_code == 303 and "Bought" in httpx.URL(done.headers["location"]).params["done"]
            bad = client.post("/shop/events", data={**form, "event_type": "refund", "csrf": _csrf(shop.text)})
            assert bad.status_code == 422 and "event_type" in bad.text
            too_long = client.get("/shop", params={"user": "u" * 300})
            assert too_long.status_code == 422 and "user" in too_long.text
    finally:
        stop(f"{APP}-open")
