"""The app's browser-free helpers: uploads, captions, the adapter library, the train form, the studio."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlora.adapters import AdapterError, AdapterFacts
from sdlora.config import ConfigError, parse_weights
from sdlora.demo import DEMO_MODEL_DIR
from sdlora.jobs import Job, JobStatus
from sdlora.train import train
from sdlora.train.events import EVENT_TYPES
from tests.conftest import draw_blob, train_config
from ui import library
from ui.bases import base_label, base_notice, base_spec
from ui.studio import Studio, chosen_adapters, make_params
from ui.training import FORM_FIELDS, TrainForm, job_view, make_config, pending_names, preset_values
from ui.uploads import UploadError, caption_rows, save_captions, stage_upload, suggest_name, thumbnails

# --- uploads -------------------------------------------------------------------------------------------


def test_a_dropped_folder_keeps_images_and_captions_and_reports_what_it_left_out(blob_folder, tmp_path):
    (blob_folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (blob_folder / "broken.png").write_bytes(b"not a png")
    staged = stage_upload(sorted(blob_folder.iterdir()), tmp_path / "uploads")
    assert staged.images == 4 and staged.folder.parent == tmp_path / "uploads"
    assert any(s.startswith("notes.pdf: not an image") for s in staged.skipped)
    assert any(s.startswith("broken.png: can't be read") for s in staged.skipped)
    assert not (staged.folder / "broken.png").exists()
    assert dict(caption_rows(staged.folder))["a.png"] == "a sks blob on a white background"


@pytest.mark.parametrize("paths", [None, [], [""]])
def test_an_empty_upload_is_refused(paths, tmp_path):
    with pytest.raises(UploadError, match="Nothing was uploaded"):
        stage_upload(paths, tmp_path)


def test_an_upload_without_images_is_refused_and_leaves_nothing(tmp_path):
    note = tmp_path / "readme.md"
    note.write_text("hi")
    with pytest.raises(UploadError, match="No usable images.*readme.md"):
        stage_upload([note], tmp_path / "uploads")
    assert list((tmp_path / "uploads").iterdir()) == []


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def png_bytes(tmp_path: Path) -> bytes:
    return draw_blob(tmp_path / "blob.png", (16, 16), (0, 0, 200)).read_bytes()


@pytest.mark.parametrize("prefix", ["", "my set/"])
def test_a_zip_is_unpacked_flat_or_from_its_one_folder(prefix, tmp_path):
    archive = make_zip(
        tmp_path / "stars.zip",
        {
            f"{prefix}x_01.png": png_bytes(tmp_path),
            f"{prefix}x_01.txt": b"a star",
            "__MACOSX/._x_01.png": b"junk",
            f"{prefix}.DS_Store": b"junk",
        },
    )
    staged = stage_upload([archive], tmp_path / "uploads")
    assert (staged.name, staged.images, staged.skipped) == ("stars", 1, [])
    assert caption_rows(staged.folder) == [["x_01.png", "a star"]]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"set/sub/a.png": b"x", "set/b.png": b"x"}, "folders inside"),
        ({"a/x.png": b"x", "b/y.png": b"x"}, "folders inside"),
        ({"../evil.png": b"x"}, "unsafe path"),
        ({"/etc/evil.png": b"x"}, "unsafe path"),
    ],
)
def test_zips_with_nested_folders_or_unsafe_paths_are_refused(members, message, tmp_path):
    with pytest.raises(UploadError, match=message):
        stage_upload([make_zip(tmp_path / "bad.zip", members)], tmp_path / "uploads")
    assert not (tmp_path / "evil.png").exists() and list((tmp_path / "uploads").iterdir()) == []


def test_a_damaged_zip_or_a_zip_with_other_files_is_refused(tmp_path):
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK not really")
    with pytest.raises(UploadError, match="can't be unpacked"):
        stage_upload([damaged], tmp_path / "uploads")
    with pytest.raises(UploadError, match="not both"):
        stage_upload([damaged, tmp_path / "a.png"], tmp_path / "uploads")


@pytest.mark.parametrize(
    ("stems", "name"),
    [
        (["sks_star_00", "sks_star_01", "sks_star_12"], "sks_star"),
        (["dog 3"], "dog"),
        (["a", "b"], "adapter"),
        ([], "adapter"),
    ],
)
def test_the_adapter_name_comes_from_the_image_names(stems, name):
    assert suggest_name(stems) == name


def test_edited_captions_are_written_back_and_only_for_the_folders_images(blob_folder, tmp_path):
    rows = caption_rows(blob_folder)
    assert [r[0] for r in rows] == ["a.png", "b.png", "c.jpg", "d.png"]
    edited = [["a.png", ""], ["b.png", "  a  new\ncaption "], ["../../evil.png", "x"], ["c.jpg"]]
    assert save_captions(blob_folder, edited) == 2
    assert not (blob_folder / "a.txt").exists()
    assert (blob_folder / "b.txt").read_text() == "a new caption"
    assert not (tmp_path / "evil.txt").exists() and not (blob_folder.parent.parent / "evil.txt").exists()
    assert thumbnails(blob_folder)[0] == (
        str(blob_folder / "a.png"),
        "(no caption: the instance prompt is used)",
    )


# --- the adapter library --------------------------------------------------------------------------------


def fake_adapter(path: Path, facts: AdapterFacts | None = None, **metadata: str) -> Path:
    """A small .safetensors file with sdlora's header facts (or another tool's metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", **(facts.to_metadata() if facts else {}), **metadata}
    save_file({"unet.x.lora_A.weight": torch.zeros(4, 8)}, str(path), metadata=header)
    return path


FACTS = AdapterFacts(
    name="star",
    base_model="/models/demo",
    family="sd1",
    rank=4,
    alpha=2.0,
    targets="all",
    trigger_words="sks",
    steps=30,
    created="2026-01-02T03:04:05+00:00",
)


def test_the_library_lists_facts_and_finds_the_runs_sample(tmp_path):
    adapter = fake_adapter(tmp_path / "adapters" / "star.safetensors", FACTS)
    fake_adapter(
        tmp_path / "adapters" / "other.safetensors", **{"ss_network_dim": "16", "ss_network_alpha": "8"}
    )
    run = tmp_path / "runs" / "star-20260102-030405"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"adapter": str(adapter)}))
    draw_blob(run / "samples" / "step-000010-0.png", (8, 8), (1, 2, 3))
    draw_blob(run / "samples" / "step-000030-0.png", (8, 8), (1, 2, 3))
    other, star = library.list_adapters(tmp_path)
    assert star.row() == ["star", "demo", "4", "2", "sks", "30", "2026-01-02 03:04"]
    assert star.sample == run / "samples" / "step-000030-0.png"
    assert (other.rank, other.alpha, other.sample) == ("16", "8", None)


def test_import_takes_only_readable_safetensors_under_a_free_name(tmp_path):
    outputs = tmp_path / "outputs"
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(AdapterError, match="only .safetensors"):
        library.import_adapter(pickle, outputs)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterError, match="not a readable"):
        library.import_adapter(damaged, outputs)
    upload = fake_adapter(tmp_path / "up" / "my style!.safetensors", FACTS)
    first, second = library.import_adapter(upload, outputs), library.import_adapter(upload, outputs)
    assert (first.name, second.name) == ("my_style.safetensors", "my_style_2.safetensors")
    assert first.read_bytes() == upload.read_bytes() and library.adapter_names(outputs) == [
        "my_style",
        "my_style_2",
    ]


def test_rename_moves_the_preview_and_refuses_taken_names(tmp_path):
    fake_adapter(tmp_path / "adapters" / "a.safetensors", FACTS)
    fake_adapter(tmp_path / "adapters" / "b.safetensors", FACTS)
    draw_blob(tmp_path / "adapters" / "a.png", (8, 8), (1, 2, 3))
    with pytest.raises(AdapterError, match="already an adapter called 'b'"):
        library.rename_adapter(tmp_path, "a", "b")
    with pytest.raises(AdapterError, match="new name"):
        library.rename_adapter(tmp_path, "a", "///")
    renamed = library.rename_adapter(tmp_path, "a", "../../escaped name")
    assert renamed == tmp_path / "adapters" / "escaped_name.safetensors"
    assert renamed.with_suffix(".png").is_file() and not (tmp_path / "adapters" / "a.png").exists()


@pytest.mark.parametrize("name", ["missing", "../adapters/a", "", "a/../a"])
def test_only_library_adapters_can_be_deleted(name, tmp_path):
    fake_adapter(tmp_path / "adapters" / "a.safetensors", FACTS)
    with pytest.raises(AdapterError, match="No adapter called"):
        library.delete_adapter(tmp_path, name)
    library.delete_adapter(tmp_path, "a")
    assert library.adapter_names(tmp_path) == []


def test_unique_names_avoid_files_and_pending_jobs(tmp_path):
    fake_adapter(tmp_path / "adapters" / "star.safetensors", FACTS)
    assert library.unique_name(tmp_path, "star", taken={"star_2"}) == "star_3"
    assert library.unique_name(tmp_path, "new one") == "new_one"


# --- the train form and the job view ---------------------------------------------------------------------


def form(data_dir: Path, **changes) -> TrainForm:
    values = dict(
        folder=str(data_dir),
        name="stars",
        prompt="a sks blob",
        class_prompt="a blob",
        prior=True,
        num_class_images=4,
        rank=4,
        alpha=0,
        steps=10,
        lr=1e-3,
        resolution=0,
        text_encoder=False,
        seed=3,
        sample_every=5,
    )
    values.update(changes)
    return TrainForm(**values)


def test_presets_fill_every_setting_and_shrink_for_the_demo_model():
    real, demo = preset_values("Subject", demo=False), preset_values("Subject", demo=True)
    assert set(real) <= set(FORM_FIELDS)
    assert (real["steps"], real["lr"], real["num_class_images"]) == (400, 1e-4, 50)
    assert (demo["steps"], demo["lr"], demo["num_class_images"]) == (300, 1e-3, 16)


def test_the_form_becomes_a_train_config(blob_folder, tmp_path):
    config = make_config(form(blob_folder), "/models/x", tmp_path, taken={"stars"})
    assert (config.name, config.class_prompt, config.alpha, config.resolution) == (
        "stars_2",
        "a blob",
        None,
        None,
    )
    assert (config.sample_every, config.sample_prompt, config.outputs) == (5, ["a sks blob"], str(tmp_path))
    assert make_config(form(blob_folder, prior=False), None, tmp_path).class_prompt is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(folder=None), "No training images yet"),
        (dict(prompt=""), "have no caption"),
        (dict(class_prompt=" "), "needs a class prompt"),
        (dict(rank=0), "--rank"),
    ],
)
def test_form_mistakes_are_named(changes, message, blob_folder, tmp_path):
    with pytest.raises(ConfigError, match=message):
        make_config(form(blob_folder, **changes), None, tmp_path)


START = dict(
    run="r",
    base="b",
    steps=4,
    start_step=0,
    images=1,
    class_images=0,
    resolution=16,
    buckets=["16x16"],
    mixed_precision="no",
    attention="AttnProcessor2_0",
    tf32=False,
    channels_last=False,
    compiled=False,
)


def job_with(events: list[dict], status: JobStatus, blob_folder: Path, job_id: int = 1) -> Job:
    job = Job(job_id, train_config(blob_folder, "x", Path("out"), name=f"job{job_id}"), status)
    job.events.extend(EVENT_TYPES[kind](**fields) for kind, fields in events)
    return job


def test_the_job_view_shows_steps_loss_samples_and_the_queue(blob_folder):
    steps = [
        (
            "step",
            dict(
                step=s,
                total=4,
                loss=1.0 / s,
                lr=1e-3,
                elapsed_s=s * 2.0,
                eta_s=(4 - s) * 40.0,
                images_per_s=1.0,
            ),
        )
        for s in (1, 2)
    ]
    running = job_with(
        [("start", START), *steps, ("sample", dict(step=2, paths=["/s/2.png"]))],
        JobStatus.RUNNING,
        blob_folder,
    )
    queued = job_with([], JobStatus.QUEUED, blob_folder, job_id=2)
    view = job_view(running, [running, queued])
    assert "step 2/4 · loss 0.5000" in view.status and "1 min 20 s left" in view.status
    assert "Queued after it: job 2 (job2)" in view.status and view.active
    assert 'value="2"' in view.progress and view.loss["loss"].tolist() == [1.0, 0.5]
    assert view.samples == [("/s/2.png", "step 2")]
    assert pending_names([running, queued]) == {"job1", "job2"}


def test_the_job_view_of_finished_jobs(blob_folder):
    failed = job_with([("start", START)], JobStatus.FAILED, blob_folder)
    failed.error = "TrainingError: the loss became nan"
    assert "failed: TrainingError: the loss became nan" in job_view(failed).status
    assert not job_view(failed).active
    starting = job_with([], JobStatus.RUNNING, blob_folder)
    assert "making class images" not in job_view(starting).status  # no class prompt in this job
    assert job_view(None).status == "No training job yet." and job_view(None).progress == ""


# --- the studio -----------------------------------------------------------------------------------------


def test_form_values_for_generation():
    assert base_spec(" demo ") is None and base_spec("") is None and base_spec("org/model") == "org/model"
    assert "demo model" in base_notice("demo") and "`org/model`" in base_notice("org/model")
    assert (base_label(str(DEMO_MODEL_DIR)), base_label("org/model")) == ("demo", "model")
    assert parse_weights("0, .5;1") == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match="numbers"):
        parse_weights("0, heavy")
    assert chosen_adapters(["a", True, 0.5, "b", False, 1, None, True, 1, "d", True, -1]) == [
        ("a", 0.5),
        ("d", -1.0),
    ]
    params = make_params(" a star ", "", 3.0, 4.0, 2, "64x32", "ddim")
    assert (params.prompt, params.seed, params.width, params.height) == ("a star", 3, 64, 32)
    assert make_params("x", "", 0, 1, 1, "native", "dpm++").width is None
    with pytest.raises(ConfigError, match="multiples of 8"):
        make_params("x", "", 0, 1, 1, "30x30", "dpm++")
    with pytest.raises(ConfigError, match="Write a prompt"):
        make_params(" ", "", 0, 1, 1, "native", "dpm++")


def test_the_studio_saves_pngs_and_reloads_an_adapter_retrained_under_its_name(
    tiny_base, blob_folder, tmp_path
):
    first = train(train_config(blob_folder, tiny_base, tmp_path, steps=1, name="blob"))
    studio = Studio(tmp_path)
    params = make_params("a sks blob", "", 1, 2, 3.0, "native", "ddim")
    result = studio.compare(tiny_base, params, [("blob", 0.7)])
    assert [label for _, label in result.images] == ["base", "blob 0.7"]
    assert all(Path(path).parent == tmp_path / "images" for path, _ in result.images)
    assert "[blob 0.7]" in result.parameters and "Lora: blob:0.7" in result.parameters
    before = studio.generate(tiny_base, params, [("blob", 1.0)])
    train(
        train_config(blob_folder, tiny_base, tmp_path, steps=1, lr=0.5, name="blob", out=str(first.adapter))
    )
    after = studio.generate(tiny_base, params, [("blob", 1.0)])
    assert Path(before.images[0][0]).read_bytes() != Path(after.images[0][0]).read_bytes()
    with pytest.raises(AdapterError, match="No adapter called 'gone'"):
        studio.generate(tiny_base, params, [("gone", 1.0)])
