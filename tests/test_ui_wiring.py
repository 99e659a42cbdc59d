"""The little the page itself renders: the base-model notice, the progress bar, the adapter rows."""

from __future__ import annotations

import pytest

from sdlora.config import ConfigError
from sdlora.generate.studio import Recalled
from sdlora.jobs import JobView
from ui.app import base_notice
from ui.generate_tab import CROSSFADE, axis_kind, chosen_adapters, filled, gallery_columns
from ui.train_tab import loss_frame, progress_bar


def test_the_base_notice_says_which_model_is_in_use():
    assert "demo model" in base_notice("demo") and "`org/model`" in base_notice("org/model")


def test_only_switched_on_rows_with_an_adapter_are_used():
    assert chosen_adapters(["a", True, 0.5, "b", False, 1, None, True, 1, "d", True, -1]) == [
        ("a", 0.5),
        ("d", -1.0),
    ]


def test_the_progress_bar_and_loss_curve_come_from_the_job_view():
    view = JobView("running", 2, 4, [(1, 1.0), (2, 0.5)], [], True)
    assert 'value="2"' in progress_bar(view) and "2/4 steps (50%)" in progress_bar(view)
    frame = loss_frame(view)
    assert frame[frame.curve == "raw"]["loss"].tolist() == [1.0, 0.5]
    assert len(frame[frame.curve == "smoothed"]) == 2


def test_the_loss_curve_shows_the_validation_loss_once_the_run_measures_it():
    view = JobView(
        "running", 4, 4, [(1, 1.0), (2, 0.5), (3, 0.6), (4, 0.4)], [], True, "", [(2, 0.7), (4, 0.65)]
    )
    frame = loss_frame(view)
    validation = frame[frame.curve == "validation"]
    assert list(zip(validation.step, validation.loss, strict=True)) == [(2, 0.7), (4, 0.65)]
    assert "validation" not in set(loss_frame(JobView("running", 1, 4, [(1, 1.0)], [], True)).curve)


def test_no_job_has_no_progress_bar_and_an_empty_loss_curve():
    view = JobView("No training job yet.", 0, 0, [], [], False)
    assert progress_bar(view) == "" and loss_frame(view).empty


def test_galleries_are_near_square_so_every_count_up_to_16_fits():
    assert [gallery_columns(n) for n in (1, 2, 4, 5, 9, 10, 16)] == [1, 2, 2, 3, 3, 4, 4]


def test_x_y_axes_name_the_adapters_their_rows_picked():
    pickers = ["style_dark", "style_outlined", None, None]
    assert axis_kind("Adapter 2 weight", pickers) == "weight:style_outlined"
    assert axis_kind(CROSSFADE, pickers) == "crossfade:style_dark:style_outlined"
    assert axis_kind("Checkpoints of run-20260101-000000", pickers) == "checkpoint:run-20260101-000000"
    assert axis_kind("Guidance", pickers) == "guidance"
    with pytest.raises(ConfigError, match="needs an adapter picked in row 3"):
        axis_kind("Adapter 3 weight", pickers)


def test_settings_sent_to_generate_keep_library_adapters_and_name_the_others():
    recalled = Recalled("a star", "", 5, None, 7.5, "32x32", "ddim", [("kept", 0.5), ("gone", 1.0)])
    values = filled(recalled, ["kept"])
    assert values[:3] == ["a star", "", 5] and values[5:7] == ["32x32", "ddim"]
    assert values[7].value == "kept" and values[8] is True and values[9] == 0.5
    assert values[10].value is None and values[11] is False
    assert "left out: gone" in values[-1]


def test_the_advanced_section_offers_the_quantized_base_and_tensorboard(tmp_path):
    from ui.app import build_app

    app = build_app(tmp_path)
    by_id = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    for elem_id, choices in [
        ("quantize-base", ["none", "nf4", "int8"]),
        ("log-with", ["none", "tensorboard"]),
    ]:
        control = by_id[elem_id]
        assert [value for _, value in control.choices] == choices
        assert "pip install" in control.info
        parent = control.parent
        while parent is not None and parent.elem_id != "advanced":
            parent = parent.parent
        assert parent is not None, f"{elem_id} is not in the Advanced section"
