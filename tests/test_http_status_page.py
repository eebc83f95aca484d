"""The status page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium)
against the real front and farm (issue 14): it asks for the API key, then shows a running job's progress
moving and a finished job's poster and playable video. The screenshot goes to ``test-output/status-page.png``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.http_fixtures import HttpFarm

pytestmark = pytest.mark.slow

# Headless, no sandbox (root in CI), nothing fetched from the network by the browser itself.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1400",
]


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them)")
    from selenium import webdriver

    # Selenium must not try to download a browser or a driver: both are the system's.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield session
    finally:
        session.quit()


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_status_page_shows_live_progress_poster_and_video(
    http_farm: HttpFarm, browser: Any, request: pytest.FixtureRequest
) -> None:
    from selenium.webdriver.common.by import By

    client = http_farm.client()
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/videos", "body": {"prompt": "a batch fox"}})
    batch_file = client.files.create(file=("page.jsonl", line.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/videos", completion_window="24h")
    finished = client.videos.create_and_poll(prompt="a finished fox", seconds="1", poll_interval_ms=200)
    assert finished.status == "completed"
    wait_for(lambda: client.batches.retrieve(batch.id).status == "completed", 60, "the batch")

    browser.get(http_farm.base_url + "/")
    assert "needs the farm's API key" in browser.page_source  # no key, no page
    browser.find_element(By.ID, "key").send_keys(http_farm.api_key)
    # The running job is created just before the page loads, so its row is rendered by the server.
    running = client.videos.create(prompt="a slow fox", seconds="1", extra_body={"steps": 100})
    browser.find_element(By.ID, "login").click()
    wait_for(lambda: browser.find_elements(By.ID, "jobs"), 10, "the jobs table")

    def progress_of(video_id: str) -> int:
        bar = browser.find_element(By.CSS_SELECTOR, f'tr[data-video="{video_id}"] progress')
        return int(float(bar.get_attribute("value") or 0))

    seen: list[int] = []

    def moved() -> bool:
        value = progress_of(running.id)
        if not seen or seen[-1] != value:
            seen.append(value)
        return len([v for v in seen if 10 < v < 100]) >= 2

    wait_for(moved, 90, f"the running job's progress to move (saw {seen})")
    assert seen == sorted(seen), seen

    row = f'tr[data-video="{finished.id}"]'
    poster_width = wait_for(
        lambda: browser.execute_script(
            f"const i = document.querySelector('{row} img.poster'); return i && i.naturalWidth"
        ),
        20,
        "the poster",
    )
    assert poster_width == 64
    video_width = wait_for(
        lambda: browser.execute_script(
            f"const v = document.querySelector('{row} video.player'); return v && v.readyState >= 1 && v.videoWidth"
        ),
        20,
        "the video's metadata (the player loaded the MP4 over ranged requests)",
    )
    assert video_width == 64
    timeline = f"img.timeline[alt='timeline of {batch.id}']"
    assert wait_for(
        lambda: browser.execute_script(f'const i = document.querySelector("{timeline}"); return i && i.naturalWidth'),
        20,
        "the batch's timeline picture",
    )

    out = Path(request.config.rootpath) / "test-output"
    out.mkdir(exist_ok=True)
    shot = out / "status-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    print(f"status page screenshot: {shot}")
    client.videos.delete(running.id)
