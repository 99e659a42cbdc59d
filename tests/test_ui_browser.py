"""The app driven in headless Chromium: upload and train, stack adapters, download, bad input.

One app serves the whole module (on a free port, with a temporary outputs folder); each test opens a fresh
page. The demo model is used when it is built, else the tiny random base, so the module stays quick on a CPU
(SDLORA_TEST_BASE=<hub id or folder> runs it against another base).
Screenshots of the tabs are saved to docs/screenshots/ for the README.
"""

from __future__ import annotations

import os
import re
import socket
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sdlora.config import TrainConfig
from sdlora.demo import demo_model_available
from sdlora.jobs import JobQueue, JobStatus
from sdlora.presets import preset_values
from sdlora.train import train
from tests.conftest import draw_blob

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
expect = sync_api.expect
pytestmark = [
    pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning"),  # stacking adapters
    pytest.mark.filterwarnings(
        "ignore:'future.no_silent_downcasting' is deprecated"
    ),  # pandas 3 in gradio's queue
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "training_data"
SCREENSHOTS = ROOT / "docs" / "screenshots"
TRAIN_TIMEOUT_MS = 150_000
TRAIN_STEPS = (
    40  # the Subject preset, shortened: the browser test checks the journey, test_learning the learning
)
STYLE_STEPS = 60  # enough for the two style adapters to show in the comparison


@dataclass
class Server:
    url: str
    outputs: Path
    base: str | None
    ready_s: float
    queue: JobQueue


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory) -> Iterator[Server]:
    """The app on 127.0.0.1, with two style adapters already in its library."""
    from ui.app import launch

    base = os.environ.get("SDLORA_TEST_BASE") or (None if demo_model_available() else tiny_base)
    outputs = tmp_path_factory.mktemp("ui-outputs")
    # Chromium and the server share the CPU with torch: OpenMP threads waiting for a busy core make the
    # tiny models' many small ops ten times slower or worse, so torch gets one thread here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name in ("style_outlined", "style_dark"):
        train(
            TrainConfig(
                data_dir=str(DATA / name),
                base=base,
                name=name,
                steps=STYLE_STEPS,
                rank=4,
                lr=1e-3,
                outputs=str(outputs),
                sample_every=STYLE_STEPS,
                sample_prompt=[f"a red circle, {name[6:]} style"],
            )
        )
    started = time.perf_counter()
    port, queue = free_port(), JobQueue()
    app = launch(port=port, outputs_dir=outputs, base=base, queue=queue, block=False)
    yield Server(f"http://127.0.0.1:{port}/", outputs, base, time.perf_counter() - started, queue)
    app.close()
    for job in queue.jobs():  # a failed test may leave a job training
        if not job.finished:
            queue.cancel(job.id)
            queue.wait(job.id, timeout=60)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    open_app(page, server)
    yield page
    page.close()


def open_app(page, server: Server) -> None:
    page.goto(server.url)
    expect(page.get_by_label("Rank")).to_be_visible(timeout=30_000)  # the page has rendered its components


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def pick(page, elem_id: str, option: str) -> None:
    """Choose an option of a gr.Dropdown."""
    dropdown = page.locator(f"#{elem_id}")
    dropdown.locator("input").click()
    dropdown.get_by_role("option", name=option, exact=True).click()


def set_number(page, elem_id: str, value: float) -> None:
    """Type into a gr.Number, or the number box of a gr.Slider."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def upload_folder(page, folder: Path) -> None:
    page.locator("#upload-folder input[type=file]").set_input_files(folder)


def drop_folder(page, folder: Path) -> None:
    """Drop `folder` on the folder upload as from a file manager: Chromium's own drag and drop (through
    the DevTools protocol), so the page gets a folder entry, not the files a picker would list."""
    box = page.locator("#upload-folder").bounding_box()
    point = {"x": box["x"] + box["width"] / 2, "y": box["y"] + box["height"] / 2}
    data = {"items": [], "files": [str(folder)], "dragOperationsMask": 1}
    devtools = page.context.new_cdp_session(page)
    for kind in ("dragEnter", "dragOver", "drop"):
        devtools.send("Input.dispatchDragEvent", {"type": kind, **point, "data": data})


def test_page_serves_with_the_base_model_named(page, server):
    notice = page.locator("#base-notice")
    expect(notice).to_contain_text("demo model" if server.base is None else server.base)
    assert server.ready_s < 30, f"the server took {server.ready_s:.1f} s to start"


def test_upload_a_folder_and_train_with_prior_preservation(page, server):
    upload_folder(page, DATA / "sks_star")
    expect(page.locator("#upload-message")).to_contain_text("8 image(s) ready")
    expect(page.locator("#thumbnails img")).to_have_count(8)
    expect(page.locator("#captions")).to_contain_text("a purple sks shape on a white background")
    expect(page.locator("#adapter-name textarea")).to_have_value("sks_star")
    page.locator("#captions").get_by_test_id("cell-3-1").dblclick()  # sks_star_03.png's caption
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("a purple sks shape on a pale yellow background")
    page.keyboard.press("Enter")
    expect(page.locator("#thumbnails")).to_contain_text("pale yellow")  # the edit reached the folder
    page.locator("#instance-prompt textarea").fill("a purple sks shape")
    expect(page.locator("#prior input")).to_be_checked()  # the Subject preset
    page.locator("#class-prompt textarea").fill("a purple shape")
    page.get_by_text("Advanced: every training option").click()
    subject = preset_values("Subject", "demo")
    for elem_id, field in (
        ("batch-size", "batch_size"),
        ("snr-gamma", "snr_gamma"),
        ("save-every", "save_every"),
    ):
        value = subject[field]  # the preset's values, shown as the number field shows them
        expect(page.locator(f"#{elem_id} input[type=number]")).to_have_value(f"{value:g}")
    for elem_id, value in (
        ("steps", TRAIN_STEPS),
        ("num-class-images", 2),
        ("sample-every", TRAIN_STEPS // 2),
    ):
        set_number(page, elem_id, value)
    set_number(page, "save-every", TRAIN_STEPS // 2)
    page.locator("#start").click()
    expect(page.locator("#start-message")).to_contain_text("submitted")

    progress, status = page.locator("#job-progress"), page.locator("#job-status")
    expect(progress).to_contain_text(re.compile(rf"[1-9]\d*/{TRAIN_STEPS} steps"), timeout=TRAIN_TIMEOUT_MS)
    seen = [progress.inner_text()]
    page.reload()  # the job lives in the queue, not in the page
    expect(status).to_contain_text("Job 1 · sks_star", timeout=30_000)
    deadline = time.monotonic() + TRAIN_TIMEOUT_MS / 1000
    while "done" not in status.inner_text():
        assert time.monotonic() < deadline and "failed" not in status.inner_text(), status.inner_text()
        seen.append(progress.inner_text())
        page.wait_for_timeout(100)
    seen.append(progress.inner_text())
    assert seen[0] != seen[-1] == f"{TRAIN_STEPS}/{TRAIN_STEPS} steps (100%)", seen
    assert (server.outputs / "adapters" / "sks_star.safetensors").is_file()
    captions = [p.read_text() for p in (server.outputs / "uploads").glob("sks_star-*/sks_star_03.txt")]
    assert captions == ["a purple sks shape on a pale yellow background"]
    expect(page.locator("#samples img")).to_have_count(2)
    expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
    page.get_by_text("This job's settings").click()
    expect(page.locator("#job-settings textarea")).to_have_value(
        re.compile(r"^data_dir = .*\nsnr_gamma = 5.0\n", re.S)
    )
    (run,) = (server.outputs / "runs").glob("sks_star-*")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000020", "step-000040"]
    upload_folder(page, DATA / "sks_star")  # the form as it was, for the screenshot
    expect(page.locator("#thumbnails img")).to_have_count(8)
    page.locator("#instance-prompt textarea").fill("a purple sks shape")
    page.locator("#class-prompt textarea").fill("a purple shape")
    shot(page, "train")

    tab(page, "Generate")  # the new adapter is offered without a restart
    page.locator("#adapter-0 input").click()
    expect(page.locator("#adapter-0").get_by_role("option", name="sks_star", exact=True)).to_be_visible()


def start_long_job(page, name: str) -> int:
    """Upload sks_star, start an endless job without prior preservation; returns its job id."""
    upload_folder(page, DATA / "sks_star")
    expect(page.locator("#upload-message")).to_contain_text("ready")
    page.locator("#adapter-name textarea").fill(name)
    page.locator("#prior input").uncheck()
    for elem_id, value in (("steps", 100_000), ("sample-every", 0)):
        set_number(page, elem_id, value)
    page.locator("#start").click()
    message = page.locator("#start-message")
    expect(message).to_contain_text(f"submitted: training {name}")
    return int(re.search(r"Job (\d+)", message.inner_text()).group(1))


def cancel_own_job(page) -> None:
    page.locator("#cancel").click()
    expect(page.locator("#confirm-cancel")).to_be_visible()
    page.locator("#confirm-cancel").click()


def test_two_pages_each_cancel_only_their_own_job(browser, server):
    first, second = (browser.new_page(viewport={"width": 1400, "height": 1000}) for _ in range(2))
    for page in (first, second):
        open_app(page, server)
    first_id = start_long_job(first, "first_job")
    second_id = start_long_job(second, "second_job")
    queue = server.queue
    expect(second.locator("#job-status")).to_contain_text(f"Job {second_id} · second_job · queued")
    expect(first.locator("#job-progress")).to_contain_text(
        re.compile(r"[1-9]\d*/100000 steps"), timeout=TRAIN_TIMEOUT_MS
    )

    first.locator("#cancel").click()  # asks first; nothing is cancelled before the confirmation
    expect(first.locator("#confirm-cancel")).to_be_visible()
    assert not queue.get(first_id).finished
    first.locator("#keep-training").click()

    cancel_own_job(second)  # the second page's (queued) job, not the first page's running one
    expect(second.locator("#job-status")).to_contain_text("second_job · cancelled")
    assert (
        queue.get(second_id).status is JobStatus.CANCELLED and queue.get(first_id).status is JobStatus.RUNNING
    )
    cancel_own_job(first)
    expect(first.locator("#job-status")).to_contain_text(
        re.compile(r"first_job · cancelled after \d+ steps"), timeout=TRAIN_TIMEOUT_MS
    )
    assert not list((server.outputs / "adapters").glob("*_job.safetensors"))
    for page in (first, second):
        page.close()


def test_after_a_restart_the_runs_tab_lists_runs_and_resumes_a_cancelled_one(browser, server, tmp_path):
    from ui.app import launch

    port, queue = free_port(), JobQueue()  # a restarted server: a new queue that knows no jobs
    app = launch(port=port, outputs_dir=server.outputs, base=server.base, queue=queue, block=False)
    restarted = Server(f"http://127.0.0.1:{port}/", server.outputs, server.base, 0.0, queue)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        open_app(page, restarted)
        tab(page, "Runs")
        runs = page.locator("#runs")
        expect(runs).to_contain_text("first_job")
        expect(runs).to_contain_text("cancelled")
        (run,) = (server.outputs / "runs").glob("first_job-*")
        pick(page, "run-pick", f"{run.name} · cancelled")
        expect(page.locator("#run-summary")).to_contain_text("first_job: cancelled")
        expect(page.locator("#run-cancel")).to_be_hidden()  # only a running or queued run offers Cancel
        page.locator("#run-resume").click()
        expect(page.locator("#run-message")).to_contain_text("resuming first_job")
        (job,) = queue.jobs()
        deadline = time.monotonic() + TRAIN_TIMEOUT_MS / 1000
        while job.last("step") is None:  # it continues from its checkpoint, in the same run folder
            assert time.monotonic() < deadline and not job.finished, job.error
            time.sleep(0.2)
        assert job.run_dir == run and job.last("start")["start_step"] > 0
        page.locator("#run-cancel").click()
        page.locator("#run-confirm-cancel").click()
        expect(page.locator("#run-message")).to_contain_text("Cancelling")
        queue.wait(job.id, timeout=120)
        page.locator("#runs-refresh").click()
        pick(page, "run-pick", f"{run.name} · cancelled")
        page.locator("#run-to-adapter").click()
        expect(page.locator("#run-message")).to_contain_text(
            re.compile(r"Saved first_job_step\d+\.safetensors")
        )
        (sks,) = (server.outputs / "runs").glob("sks_star-*")
        pick(page, "run-pick", f"{sks.name} · done")
        expect(page.locator("#run-message")).not_to_contain_text("Saved")  # that was about the other run
        expect(page.locator("#run-cancel")).to_be_hidden()
        expect(page.locator("#run-samples img")).to_have_count(2)  # steps 20 and 40 of one sample prompt
        shot(page, "runs")
    finally:
        page.close()
        app.close()


def test_stack_two_adapters_and_compare_side_by_side(page, server):
    tab(page, "Generate")
    page.locator("#gen-prompt textarea").fill("a red circle on a white background")
    set_number(page, "gen-steps", 20)
    pick(page, "adapter-0", "style_outlined")
    pick(page, "adapter-1", "style_dark")
    expect(page.locator("#adapter-on-1 input")).to_be_checked()
    set_number(page, "adapter-weight-0", 0.8)
    set_number(page, "adapter-weight-1", 1.5)
    page.locator("#compare").click()
    gallery = page.locator("#gallery")
    expect(gallery.locator("img")).to_have_count(4, timeout=60_000)
    for label in ("base", "style_outlined 0.8", "style_dark 1.5", "mix"):
        expect(gallery).to_contain_text(label)
    expect(page.locator("#parameters textarea")).to_have_value(
        re.compile(r"\[mix\].*Lora: style_outlined:0\.8, style_dark:1\.5", re.S)
    )
    mix = page.request.get(gallery.locator("img").nth(3).get_attribute("src")).body()
    assert (
        mix.startswith(b"\x89PNG") and b"Lora: style_outlined:0.8, style_dark:1.5" in mix
    )  # parameters kept
    shot(page, "generate")

    page.locator("#sweep").click()
    expect(gallery).to_contain_text("style_outlined 1.5", timeout=60_000)
    expect(gallery.locator("img")).to_have_count(4)


def test_download_an_adapter_byte_identical(page, server, tmp_path):
    tab(page, "Adapters")
    expect(page.locator("#library")).to_contain_text("style_dark")
    pick(page, "library-pick", "style_dark")
    expect(page.locator("#library-details")).to_contain_text("style_dark")
    with page.expect_download() as download:
        page.locator("#download").click()
    saved = tmp_path / "downloaded.safetensors"
    download.value.save_as(saved)
    assert saved.read_bytes() == (server.outputs / "adapters" / "style_dark.safetensors").read_bytes()
    shot(page, "adapters")


def test_import_rename_and_delete_an_adapter(page, server, tmp_path):
    library, message = server.outputs / "adapters", page.locator("#library-message")
    upload = tmp_path / "my import.safetensors"
    upload.write_bytes((library / "style_dark.safetensors").read_bytes())
    tab(page, "Adapters")
    page.locator("#import input[type=file]").set_input_files(upload)
    expect(message).to_contain_text("Imported my_import.safetensors")
    expect(page.locator("#library-pick input")).to_have_value("my_import")
    expect(page.locator("#new-name textarea")).to_have_value("my_import")  # the details have been shown
    page.locator("#new-name textarea").fill("renamed one")
    page.locator("#rename").click()
    expect(message).to_contain_text("Renamed my_import to renamed_one")
    assert (library / "renamed_one.safetensors").read_bytes() == upload.read_bytes()
    page.locator("#delete").click()
    expect(page.locator("#confirm-delete")).to_be_visible()
    assert (library / "renamed_one.safetensors").exists()  # nothing is deleted before the confirmation
    page.locator("#confirm-delete").click()
    expect(message).to_contain_text("Deleted renamed_one")
    expect(page.locator("#library")).not_to_contain_text("renamed_one")
    assert not (library / "renamed_one.safetensors").exists()


def test_bad_input_shows_a_message_and_the_app_keeps_working(page, server, tmp_path):
    toast = page.get_by_test_id("toast-body")
    page.locator("#start").click()
    expect(page.locator("#start-message")).to_contain_text("No training images yet")
    expect(toast.first).to_contain_text("No training images yet")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    draw_blob(mixed / "one.png", (32, 32), (200, 0, 0), caption="a red blob")
    (mixed / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    upload_folder(page, mixed)
    expect(page.locator("#upload-message")).to_contain_text("notes.pdf: not an image")
    expect(page.locator("#upload-message")).to_contain_text("1 image(s) ready")

    kohya = tmp_path / "kohya.zip"  # kohya's N_words sub-folders keep their repeats and prompts
    other = draw_blob(tmp_path / "other.png", (32, 32), (0, 200, 0))  # an exact copy would be left out
    with zipfile.ZipFile(kohya, "w") as archive:
        archive.write(other, "set/5_red blob/one.png")
        archive.write(mixed / "one.png", "set/one.png")
        archive.writestr("set/__init__.py", "")
    page.locator("#upload-zip input[type=file]").set_input_files(kohya)
    expect(page.locator("#upload-message")).to_contain_text("__init__.py: not an image")  # as text
    expect(page.locator("#upload-message")).to_contain_text("2 image(s) ready")
    expect(page.locator("#captions")).to_contain_text("5_red blob/one.png")
    expect(page.locator("#adapter-name textarea")).to_have_value("kohya")

    tab(page, "Adapters")
    page.locator("#import input[type=file]").set_input_files(mixed / "notes.pdf")
    expect(page.locator("#library-message")).to_contain_text("only .safetensors")

    page.locator("#base-model textarea").fill("/nonexistent/model.safetensors")
    page.locator("#base-model textarea").press("Enter")  # as Load does (its button may be under a toast)
    expect(page.locator("#base-notice")).to_contain_text("does not exist")

    open_app(page, server)  # still serving
    upload_folder(page, mixed)
    expect(page.locator("#upload-message")).to_contain_text("1 image(s) ready")


def test_dropping_a_folder_works_like_picking_it(page, server, tmp_path):
    """Browsers hand a dropped folder to the page as one entry Gradio can't read ("Failed to fetch"):
    the page walks it, so sub-folders keep their kohya repeats and same-named files are both kept."""
    folder = tmp_path / "my_set"
    (folder / "3_red blob").mkdir(parents=True)
    draw_blob(folder / "one.png", (32, 32), (200, 0, 0), caption="a red blob")
    draw_blob(folder / "3_red blob" / "one.png", (32, 32), (0, 0, 200))
    drop_folder(page, folder)
    expect(page.locator("#upload-message")).to_contain_text("2 image(s) ready")
    expect(page.locator("#captions")).to_contain_text("3_red blob/one.png")
    expect(page.locator("#adapter-name textarea")).to_have_value("my_set")
    open_app(page, server)  # a fresh upload area (Gradio's shows the files once it holds some)
    empty = tmp_path / "empty"
    empty.mkdir()
    drop_folder(page, empty)
    expect(page.locator("#upload-message")).to_contain_text("has no files")
