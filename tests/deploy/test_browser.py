"""End to end in headless Chromium: upload a bottle image on the page, compare with the API, move the slider.

Skips (with the reason) when chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kdad.runner import TorchRunner
from kdad.serve import create_app
from tests.deploy.fixtures import bottle_test_images, live_server, tiny_run

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find(names: tuple[str, ...]) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    browser, chromedriver = _find(CHROMIUM_NAMES), _find(("chromedriver",))
    if browser is None or chromedriver is None:
        pytest.skip("chromium/chromedriver not found (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    try:
        drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    except Exception as e:  # noqa: BLE001  # e.g. a chromedriver that does not match the browser version
        pytest.skip(f"cannot start headless chromium: {type(e).__name__}: {str(e).splitlines()[0]}")
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def test_upload_shows_api_score_and_slider_redecides(driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    runner = TorchRunner(tiny_run("rd"), device="cpu")
    image = next(p for p in bottle_test_images(1) if p.parent.name != "good")
    with live_server(create_app(runner)) as url:
        api = httpx.post(
            f"{url}/predict", files={"file": (image.name, image.read_bytes(), "image/png")}, timeout=120
        ).json()
        driver.get(f"{url}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "stored-threshold").text not in ("", "–"))
        driver.find_element(By.ID, "file-input").send_keys(str(image))
        score_el = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#results .card .score"))
        shown = float(score_el.get_attribute("data-score"))
        assert shown == api["score"]  # the exact float the API returned
        assert float(score_el.text) == pytest.approx(api["score"], rel=1e-5)  # the 6 significant digits shown
        card = driver.find_element(By.CSS_SELECTOR, "#results .card")
        assert card.get_attribute("data-decision") == str(api["decision"])
        src = card.find_element(By.CSS_SELECTOR, "img.overlay").get_attribute("src")
        assert src == f"data:image/png;base64,{api['heatmap_png_base64']}"

        requests_before = driver.execute_script("return performance.getEntriesByType('resource').length")
        for threshold, expected in ((api["score"] * 0.5, "1"), (api["score"] * 2, "0")):
            driver.execute_script(
                "const s = document.getElementById('threshold');"
                "s.max = String(arguments[0] * 4); s.step = 'any'; s.value = String(arguments[0]);"
                "s.dispatchEvent(new Event('input'));",
                threshold,
            )
            assert card.get_attribute("data-decision") == expected
            assert card.find_element(By.CSS_SELECTOR, ".decision").text == (
                "ANOMALOUS" if expected == "1" else "normal"
            )
        assert (
            driver.execute_script("return performance.getEntriesByType('resource').length") == requests_before
        )
        external = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(n => !n.startsWith(arguments[0]))",
            url,
        )
        assert external == []  # the page loads nothing from outside the server (works offline)
