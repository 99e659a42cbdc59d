"""The Generate journey in headless Chromium: whole images at every count, Stop (and a page that went
away), Ctrl+Enter, the Size menu, adapter menus that follow the library, PNG info and history with
"Send to Generate", X/Y plots with the cross-fade preset, and the base image after 200 mixes.

One app serves the module (the demo model when built, else the tiny random base), with two style
adapters trained briefly: these tests check the page, test_learning what the adapters learn.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from collections.abc import Iterator

import pytest
import torch
from PIL import Image, ImageDraw

from sdlora.config import TrainConfig
from sdlora.demo import demo_model_available
from sdlora.generate.images import parameters_text
from sdlora.jobs import JobQueue
from sdlora.train import train
from tests.test_ui_browser import (  # noqa: F401  (the browser fixture is shared)
    CHROMIUM_ARGS,
    DATA,
    Server,
    browser,
    expect,
    free_port,
    pick,
    pytestmark,
    set_number,
    shot,
    tab,
)

STYLE_STEPS = 12  # enough to change the image; the styles themselves are test_learning's concern
GENERATE_TIMEOUT_MS = 60_000
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory) -> Iterator[Server]:
    from ui.app import launch

    base = os.environ.get("SDLORA_TEST_BASE") or (None if demo_model_available() else tiny_base)
    outputs = tmp_path_factory.mktemp("generate-outputs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_ui_browser.py's server
    for name in ("style_outlined", "style_dark"):
        train(
            TrainConfig(
                data_dir=str(DATA / name),
                base=base,
                name=name,
                steps=STYLE_STEPS,
                rank=4,
                lr=3e-3,
                outputs=str(outputs),
                save_every=STYLE_STEPS // 2,  # checkpoints for the X/Y plot's checkpoint axis
            )
        )
    port, queue = free_port(), JobQueue()
    app = launch(port=port, outputs_dir=outputs, base=base, queue=queue, block=False)
    yield Server(f"http://127.0.0.1:{port}/", outputs, base, 0.0, queue)
    app.close()
    torch.set_num_threads(threads)


def open_generate(page, server: Server) -> None:
    page.goto(server.url)
    tab(page, "Generate")
    expect(page.locator("#gen-size input")).not_to_have_value("", timeout=30_000)  # the base's sizes came


@pytest.fixture
def page(browser, server):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    open_generate(page, server)
    yield page
    page.close()


def fill_form(page, steps: int = 4, seed: int = 7) -> None:
    page.locator("#gen-prompt textarea").fill(PROMPT)
    set_number(page, "gen-steps", steps)
    set_number(page, "gen-seed", seed)


def gallery_images(page):
    return page.locator("#gallery img")


def image_bytes(page, index: int = 0) -> bytes:
    return page.request.get(gallery_images(page).nth(index).get_attribute("src")).body()


def pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def assert_whole_and_pixelated(page, count: int) -> None:
    """Every image lies inside the gallery and the viewport, uncropped, drawn with sharp pixels."""
    images = gallery_images(page)
    expect(images).to_have_count(count, timeout=GENERATE_TIMEOUT_MS)
    frame = page.locator("#gallery").bounding_box()
    for index in range(count):
        image = images.nth(index)
        expect(image).to_be_visible()
        box = image.bounding_box()
        assert box["width"] >= 48 and box["height"] >= 48, box  # a usable size, not a thumbnail speck
        assert frame["y"] <= box["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"] + 1
        assert frame["x"] <= box["x"] and box["x"] + box["width"] <= frame["x"] + frame["width"] + 1
        style = image.evaluate(
            "e => [getComputedStyle(e).objectFit, getComputedStyle(e).imageRendering, e.naturalWidth]"
        )
        assert style[0] == "contain" and style[1] == "pixelated", style


def test_the_size_menu_offers_the_bases_sizes_native_first(page, server):
    page.locator("#gen-size input").click()
    options = [text.split()[-1] for text in page.locator("#gen-size").get_by_role("option").all_inner_texts()]
    if server.base is None:  # the demo model: 32 px native, nothing of 512 px or more
        assert options[0] == "32x32"
        assert all(max(int(side) for side in option.split("x")) <= 64 for option in options), options


def test_one_and_sixteen_images_are_shown_whole(page, server):
    fill_form(page)
    page.locator("#generate").click()
    assert_whole_and_pixelated(page, 1)
    shot(page, "generate-1-image")
    page.locator("#sweep-weights textarea").fill(", ".join(f"{w / 10:g}" for w in range(16)))
    pick(page, "adapter-0", "style_outlined")
    page.locator("#sweep").click()
    try:
        expect(page.locator("#gallery")).to_contain_text("style_outlined 1.5", timeout=GENERATE_TIMEOUT_MS)
    except AssertionError as error:  # say what the page said
        message = page.locator("#generate-message").inner_text()
        chosen = page.locator("#adapter-0 input").input_value()
        raise AssertionError(f"message {message!r}, adapter {chosen!r}") from error
    assert_whole_and_pixelated(page, 16)
    shot(page, "generate-16-images")
    page.locator("#sweep-weights textarea").fill(", ".join("0" * 17))
    page.locator("#sweep").click()
    expect(page.locator("#generate-message")).to_contain_text("at most 16")


def test_ctrl_enter_in_the_prompt_generates(page, server):
    fill_form(page)
    page.locator("#gen-prompt textarea").press("Control+Enter")
    expect(gallery_images(page)).to_have_count(1, timeout=GENERATE_TIMEOUT_MS)
    assert page.locator("#gen-prompt textarea").input_value() == PROMPT  # no newline typed


def test_seed_minus_one_draws_a_seed_and_shows_it(page, server):
    fill_form(page, seed=-1)
    page.locator("#generate").click()
    expect(page.locator("#parameters textarea")).to_have_value(re.compile(r"Seed: \d+"))
    assert "Seed: -1" not in page.locator("#parameters textarea").input_value()


def long_sweep(page) -> None:
    """A click that takes long: 16 images of many steps at 4x the native size."""
    fill_form(page, steps=100)
    page.locator("#gen-size input").fill("128x128")
    page.locator("#gen-size input").press("Enter")
    pick(page, "adapter-0", "style_outlined")
    page.locator("#sweep-weights textarea").fill(", ".join(["1"] * 16))
    page.locator("#sweep").click()


def test_stop_ends_the_generation_between_steps(page, server):
    long_sweep(page)
    expect(page.locator("#gallery .progress-text, #gallery .eta-bar").first).to_be_attached(timeout=10_000)
    page.wait_for_timeout(1_000)
    started = time.perf_counter()
    page.locator("#stop").click()
    expect(page.locator("#generate-message")).to_contain_text("Stopped", timeout=30_000)
    latency = time.perf_counter() - started
    print(f"stop latency through the page: {latency:.2f} s")
    assert latency < 5, latency
    fill_form(page, steps=2)  # the next click is not stopped by the old Stop
    page.locator("#gen-size input").fill("32x32" if server.base is None else "")
    page.locator("#generate").click()
    expect(gallery_images(page)).to_have_count(1, timeout=GENERATE_TIMEOUT_MS)


def test_a_page_that_went_away_stops_its_generation(browser, page, server):  # noqa: F811
    leaving = browser.new_page(viewport={"width": 1400, "height": 1000})
    open_generate(leaving, server)
    long_sweep(leaving)
    expect(leaving.locator("#gallery .progress-text, #gallery .eta-bar").first).to_be_attached(timeout=10_000)
    images = len(list((server.outputs / "images").glob("*.png")))
    fill_form(page, steps=2)
    page.locator("#generate").click()
    expect(page.locator("#gallery")).to_contain_text(re.compile(r"queue: ?1/1"))  # it says it waits
    started = time.perf_counter()
    leaving.close()  # ... and is served as soon as the closed page's generation stopped
    expect(gallery_images(page)).to_have_count(1, timeout=GENERATE_TIMEOUT_MS)
    waited = time.perf_counter() - started
    print(f"another page's image after closing a generating page: {waited:.2f} s")
    assert waited < 10, waited  # 16 images of 100 steps at 128 px take minutes here
    assert len(list((server.outputs / "images").glob("*.png"))) == images + 1  # nothing of the closed page


def test_the_adapter_menus_follow_the_library(page, server):
    library = server.outputs / "adapters"
    pick(page, "adapter-0", "style_outlined")  # a pick the refresh must keep
    assert page.locator("#adapter-on-0 input").is_checked()  # at once, in the page: no round trip to lose
    shutil.copy(library / "style_dark.safetensors", library / "fresh_one.safetensors")  # a job finished
    page.locator("#adapter-2 input").click()
    expect(page.locator("#adapter-2").get_by_role("option", name="fresh_one", exact=True)).to_be_visible(
        timeout=5_000
    )
    page.locator("#gen-prompt textarea").click()  # the menu closes
    (library / "fresh_one.safetensors").unlink()  # deleted (or renamed) elsewhere
    page.wait_for_timeout(3_000)
    page.locator("#adapter-2 input").click()
    expect(page.locator("#adapter-2").get_by_role("option", name="style_dark", exact=True)).to_be_visible()
    expect(page.locator("#adapter-2").get_by_role("option", name="fresh_one", exact=True)).to_have_count(0)
    assert page.locator("#adapter-0 input").input_value() == "style_outlined"


def test_png_info_reads_a_png_and_sends_its_settings_to_generate(page, server, tmp_path):
    a1111 = tmp_path / "a1111.png"  # as AUTOMATIC1111 writes it
    text = (
        "a blue square <lora:style_dark:0.6>\nNegative prompt: blurry\n"
        "Steps: 9, Sampler: Euler a, CFG scale: 5.5, Seed: 1234, Size: 48x48, Model: demo, "
        "Lora: style_outlined:0.7, style_dark:0.6, Version: v1.10.1"
    )
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    image = Image.new("RGBA", (32, 32), "white")  # a mode Gradio would convert, dropping the text
    ImageDraw.Draw(image).rectangle((8, 8, 24, 24), fill="navy")
    image.save(a1111, pnginfo=info)
    tab(page, "PNG info")
    page.locator("#png-drop input[type=file]").set_input_files(a1111)
    expect(page.locator("#png-parameters textarea")).to_have_value(text)
    shot(page, "png-info")
    page.locator("#png-send").click()
    expect(page.locator("#gen-prompt textarea")).to_have_value("a blue square <lora:style_dark:0.6>")
    expect(page.locator("#gen-negative textarea")).to_have_value("blurry")
    expect(page.locator("#gen-seed input")).to_have_value("1234")
    expect(page.locator("#gen-steps input[type=number]")).to_have_value("9")
    expect(page.locator("#gen-guidance input[type=number]")).to_have_value("5.5")
    expect(page.locator("#gen-size input")).to_have_value("48x48")
    expect(page.locator("#gen-scheduler input")).to_have_value("euler-a")
    expect(page.locator("#adapter-0 input")).to_have_value("style_outlined")  # style_dark is in the prompt
    expect(page.locator("#adapter-on-0 input")).to_be_checked()
    expect(page.locator("#adapter-weight-0 input[type=number]")).to_have_value("0.7")
    expect(page.locator("#adapter-1 input")).to_have_value("")
    page.locator("#generate").click()  # the sent settings make the same parameters again
    expect(page.locator("#parameters textarea")).to_have_value(
        re.compile(r"Steps: 9, Sampler: Euler a, CFG scale: 5.5, Seed: 1234, Size: 48x48"),
        timeout=GENERATE_TIMEOUT_MS,
    )


def test_history_reopens_an_image_with_its_settings(page, server):
    fill_form(page, steps=3, seed=4321)
    pick(page, "adapter-1", "style_dark")
    set_number(page, "adapter-weight-1", 0.35)
    pick(page, "adapter-3", "style_outlined")
    set_number(page, "adapter-weight-3", -0.5)
    page.locator("#generate").click()
    expect(page.locator("#parameters textarea")).to_have_value(re.compile("Seed: 4321"))
    page.reload()  # a fresh page: history comes from outputs/images, not from the page
    tab(page, "History")
    history = page.locator("#history")
    expect(history.locator("img").first).to_be_visible(timeout=10_000)
    history.locator("img").first.click()  # newest first
    expect(page.locator("#history-parameters textarea")).to_have_value(re.compile("Seed: 4321"))
    page.locator("#history-send").click()
    expect(page.locator("#gen-seed input")).to_have_value("4321")
    expect(page.locator("#gen-steps input[type=number]")).to_have_value("3")
    expect(page.locator("#adapter-0 input")).to_have_value("style_dark")
    expect(page.locator("#adapter-weight-0 input[type=number]")).to_have_value("0.35")
    expect(page.locator("#adapter-1 input")).to_have_value("style_outlined")
    expect(page.locator("#adapter-weight-1 input[type=number]")).to_have_value("-0.5")
    expect(page.locator("#adapter-on-1 input")).to_be_checked()
    expect(page.locator("#adapter-3 input")).to_have_value("")


def test_xy_plot_with_the_crossfade_preset_saves_one_labelled_png(page, server):
    fill_form(page, steps=4)
    pick(page, "adapter-0", "style_outlined")
    pick(page, "adapter-1", "style_dark")
    page.get_by_text("X/Y plot").click()
    page.locator("#crossfade").click()
    expect(page.locator("#x-values textarea")).to_have_value("0, 0.25, 0.5, 0.75, 1")
    pick(page, "y-kind", "Seed")
    page.locator("#y-values textarea").fill("1, 2, 3")
    page.locator("#plot").click()
    expect(gallery_images(page)).to_have_count(1, timeout=GENERATE_TIMEOUT_MS)
    grid = image_bytes(page)
    text = parameters_text(Image.open(io.BytesIO(grid)))
    assert text.count("Seed: ") == 15
    assert "[seed 3 | style_outlined 0 / style_dark 1]" in text
    assert "Lora: style_outlined:0.25, style_dark:0.75" in text
    width, height = Image.open(io.BytesIO(grid)).size
    assert width > height  # 5 columns, 3 rows, labelled
    assert_whole_and_pixelated(page, 1)
    shot(page, "xy-plot")
    pick(page, "y-kind", "Steps")
    page.locator("#y-values textarea").fill("1, 2, 3, 4")
    page.locator("#plot").click()
    expect(page.locator("#generate-message")).to_contain_text("at most 16")


def test_xy_plot_of_a_runs_checkpoints(page, server):
    (run,) = (server.outputs / "runs").glob("style_dark-*")
    fill_form(page, steps=4)
    page.get_by_text("X/Y plot").click()
    pick(page, "x-kind", f"Checkpoints of {run.name}")
    half = STYLE_STEPS // 2
    expect(page.locator("#x-values textarea")).to_have_value(f"{half}, {STYLE_STEPS}")
    pick(page, "y-kind", "Guidance")
    page.locator("#y-values textarea").fill("3, 7")
    page.locator("#plot").click()
    expect(gallery_images(page)).to_have_count(1, timeout=GENERATE_TIMEOUT_MS)
    text = parameters_text(Image.open(io.BytesIO(image_bytes(page))))
    assert f"[guidance 7 | step {STYLE_STEPS}]" in text and f"Lora: {run.name}_step{half}:1" in text
    page.locator("#x-values textarea").fill("5")
    page.locator("#plot").click()
    expect(page.locator("#generate-message")).to_contain_text(f"has no checkpoint at step 5; it has {half}")


def base_image(page) -> bytes:
    for index in range(4):
        if page.locator(f"#adapter-on-{index} input").is_checked():
            page.locator(f"#adapter-on-{index} input").uncheck()
    page.locator("#live input").uncheck()
    page.locator("#generate").click()
    expect(page.locator("#parameters textarea")).not_to_have_value(re.compile("Lora:"))
    expect(page.locator("#parameters textarea")).to_have_value(re.compile("Seed: 11,"))
    return image_bytes(page)


def test_200_live_weight_changes_leave_the_base_image_exact(browser, page, server):  # noqa: F811
    fill_form(page, steps=1, seed=11)
    pick(page, "adapter-0", "style_outlined")
    pick(page, "adapter-1", "style_dark")
    page.locator("#live input").check()
    parameters, started = page.locator("#parameters textarea"), time.perf_counter()
    before = len(list((server.outputs / "images").glob("*.png")))
    for move in range(200):
        weight = round((move % 17) * 0.25 - 2, 2)  # -2 .. 2
        set_number(page, f"adapter-weight-{move % 2}", weight)
        if move % 20 == 19:  # renders queue as "always last": wait now and then for the newest
            shown = re.escape(f"{('style_outlined', 'style_dark')[move % 2]}:{weight:g},")
            expect(parameters).to_have_value(re.compile(shown), timeout=GENERATE_TIMEOUT_MS)
    renders = len(list((server.outputs / "images").glob("*.png"))) - before
    print(f"200 live weight changes: {time.perf_counter() - started:.1f} s, {renders} mixes rendered")
    assert renders >= 60  # "always last": a move made while one renders may be folded into the next
    mixed = base_image(page)

    from ui.app import launch

    port = free_port()
    fresh_app = launch(port=port, outputs_dir=server.outputs, base=server.base, block=False)
    fresh = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        open_generate(fresh, Server(f"http://127.0.0.1:{port}/", server.outputs, server.base, 0.0, None))
        fill_form(fresh, steps=1, seed=11)
        fresh_base = base_image(fresh)
    finally:
        fresh.close()
        fresh_app.close()
    assert pixels(mixed) == pixels(fresh_base)
