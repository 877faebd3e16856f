"""The atlas site in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium), opened
from ``file://`` with no server and no network: no console error, every image resolves, search finds a class, a
hostile class name is text and runs nothing, and the index of a 1000-class atlas loads in under a second.

Skipped only when Chromium is absent on a developer's machine; under CI (``CI`` set) a missing browser fails."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # pytest's importlib mode does not put this folder on the path
from fake_atlas import HOSTILE_NAME, class_name, write_fake_atlas, write_fake_comparison  # noqa: E402

from explain.atlas.site import render_comparison, render_site  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
         "--disable-dev-shm-usage")  # containers often have a tiny /dev/shm
# records any alert() before the page's own scripts run: a hostile name that executed would leave a trace here
CATCH_ALERTS = "window.__alerts = []; window.alert = (m) => window.__alerts.push(String(m));"
# every <img> src and every map thumbnail, each loaded afresh, so lazy loading cannot hide a broken URL
IMAGES_RESOLVE = """
const done = arguments[arguments.length - 1];
const urls = [...document.images].map(i => i.src).filter(Boolean)
  .concat([...document.querySelectorAll('[data-thumb]')].map(c => new URL(c.dataset.thumb, location.href).href));
Promise.all(urls.map(url => new Promise(ok => {
  const img = new Image();
  img.onload = () => ok([url, img.naturalWidth]);
  img.onerror = () => ok([url, 0]);
  img.src = url;
}))).then(done);
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        message = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.set_capability("unhandledPromptBehavior", "ignore")  # an alert stays open, so the test can see it
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CATCH_ALERTS})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("atlas")
    write_fake_atlas(root, n_classes=5)
    render_site(root)
    return root


def open_page(driver, path: Path, has_images: bool = True) -> None:
    """Load ``path`` from file://, then check: no console error, no alert, every image resolves."""
    driver.get(path.as_uri())
    errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"console errors on {path}: {errors}"
    assert driver.execute_script("return window.__alerts") == [], f"an alert ran on {path}"
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018
    images = driver.execute_async_script(IMAGES_RESOLVE)
    assert bool(images) == has_images, f"{len(images)} images on {path}"
    broken = [url for url, width in images if width == 0]
    assert not broken, f"images that do not load on {path}: {broken}"


def visible_rows(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#classes tbody tr')].filter(r => !r.hidden)"
        ".map(r => r.cells[1].textContent.trim())"
    )


def test_index_search_and_two_class_pages_in_chromium(browser, atlas):
    from selenium.webdriver.common.by import By

    open_page(browser, atlas / "index.html", has_images=False)
    box = browser.find_element(By.ID, "search")
    box.send_keys("lynx")
    assert visible_rows(browser) == ["lynx"]
    box.clear()
    box.send_keys("<script")  # the hostile name is found as the text it is
    assert visible_rows(browser) == [HOSTILE_NAME]
    box.clear()
    box.send_keys("no such class")
    assert visible_rows(browser) == [] and browser.find_element(By.ID, "no-match").is_displayed()
    box.clear()
    box.send_keys(" ")  # an empty query shows every class again
    names = visible_rows(browser)
    header = browser.find_element(By.XPATH, "//th[text()='Class']")
    header.click()
    assert visible_rows(browser) == sorted(names, key=str.lower)
    header.click()
    assert visible_rows(browser) == sorted(names, key=str.lower, reverse=True)
    browser.find_element(By.XPATH, "//th[text()='Images']").click()  # numbers: largest first
    assert visible_rows(browser)[-1] == names[-1]  # the skipped class has the fewest images

    open_page(browser, atlas / "classes" / "0000" / "index.html")
    assert browser.find_element(By.TAG_NAME, "h1").text == "tabby cat"
    cards = browser.find_elements(By.CSS_SELECTOR, "article.card h2")
    assert cards and all(card.text.startswith("Concept ") and "(importance " in card.text for card in cards)
    # the map: hovering a dot shows its image and caption; a legend button picks out one concept's images
    dot = browser.find_element(By.CSS_SELECTOR, "#map circle[data-thumb]")
    from selenium.webdriver import ActionChains

    ActionChains(browser).move_to_element(dot).perform()
    assert browser.find_element(By.CSS_SELECTOR, "#preview figcaption").text == dot.get_attribute("data-caption")
    button = browser.find_element(By.CSS_SELECTOR, "#legend button")
    button.click()
    dimmed = browser.execute_script("return [...document.querySelectorAll('#map circle')]"
                                    ".map(c => [c.dataset.concept, c.classList.contains('dim')])")
    assert all(is_dim == (concept != button.get_attribute("data-concept")) for concept, is_dim in dimmed)

    open_page(browser, atlas / "classes" / "0001" / "index.html")  # the hostile class
    assert browser.find_element(By.TAG_NAME, "h1").text == HOSTILE_NAME
    assert browser.title.startswith(HOSTILE_NAME)
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1  # only assets/atlas.js
    # a nearest-concept link leads to the card of that concept on the other class's page
    link = browser.find_element(By.CSS_SELECTOR, "ul.nearest a")
    link.click()
    fragment = browser.current_url.split("#")[1]
    assert browser.find_element(By.ID, fragment).tag_name == "article"
    open_page(browser, Path(unquote(urlsplit(browser.current_url).path)))


def test_comparison_pages_in_chromium(browser, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_fake_atlas(a, n_classes=3)
    write_fake_atlas(b, n_classes=3, seed=1)
    render_site(a)
    write_fake_comparison(c, a, b, match="maps")
    render_comparison(c)
    open_page(browser, c / "classes" / "0001" / "index.html")
    from selenium.webdriver.common.by import By

    assert browser.find_element(By.TAG_NAME, "h1").text == f"{HOSTILE_NAME}: what changed"
    # compare.json's "match" is what the page says was matched
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "on the cosine of their coefficient maps" in body and "directions" not in body


def test_index_of_a_1000_class_atlas_loads_under_one_second(browser, tmp_path):
    write_fake_atlas(tmp_path, n_classes=1000, n_concepts=3, n_images=8, shared_images=True)
    render_site(tmp_path)
    loads = []
    for _ in range(3):  # the best of three: the page's own cost, less the noise of a shared machine
        open_page(browser, tmp_path / "index.html", has_images=False)
        loads.append(browser.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd"))
    print(f"\n1000-class index: load event at {', '.join(f'{ms:.0f}' for ms in loads)} ms after navigation start")
    assert 0 < min(loads) < 1000  # the target, measured by the browser itself (~100 ms on a quiet machine)
    from selenium.webdriver.common.by import By

    assert len(browser.find_elements(By.CSS_SELECTOR, "#classes tbody tr")) == 1000
    browser.find_element(By.ID, "search").send_keys("0998")
    assert visible_rows(browser) == [class_name(998)]
