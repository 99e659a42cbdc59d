"""Uploads become training folders: dropped files or one .zip, junk left out, captions editable as a table."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import pytest

from sdlora.data.uploads import (
    EMPTY_FOLDER,
    RELATIVE_SEP,
    UNUSED_UPLOAD_AGE_S,
    UploadError,
    UploadLedger,
    caption_rows,
    clean_uploads,
    save_captions,
    stage_upload,
    suggest_name,
    thumbnails,
)
from sdlora.errors import SdloraError
from sdlora.outputs import Outputs
from tests.conftest import draw_blob


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def png_bytes(tmp_path: Path, colour: tuple[int, int, int] = (0, 0, 200)) -> bytes:
    return draw_blob(tmp_path / "blob.png", (16, 16), colour).read_bytes()


def test_upload_errors_are_sdlora_errors():
    assert issubclass(UploadError, SdloraError)


def test_a_dropped_folder_keeps_images_and_captions_and_reports_what_it_left_out(blob_folder, tmp_path):
    (blob_folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (blob_folder / "broken.png").write_bytes(b"not a png")
    staged = stage_upload(sorted(blob_folder.iterdir()), Outputs(tmp_path))
    assert staged.images == 4 and staged.folder.parent == tmp_path / "uploads"
    assert any(s.startswith("notes.pdf: not an image") for s in staged.skipped)
    assert any(s.startswith("broken.png: can't be read") for s in staged.skipped)
    assert not (staged.folder / "broken.png").exists()
    assert dict(caption_rows(staged.folder))["a.png"] == "a sks blob on a white background"


@pytest.mark.parametrize("paths", [None, [], [""]])
def test_an_empty_upload_is_refused(paths, tmp_path):
    with pytest.raises(UploadError, match="Nothing was uploaded"):
        stage_upload(paths, Outputs(tmp_path))


def test_an_upload_without_images_is_refused_and_leaves_nothing(tmp_path):
    note = tmp_path / "readme.md"
    note.write_text("hi")
    with pytest.raises(UploadError, match="No usable images.*readme.md"):
        stage_upload([note], Outputs(tmp_path))
    assert list((tmp_path / "uploads").iterdir()) == []


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
    staged = stage_upload([archive], Outputs(tmp_path))
    assert (staged.name, staged.images, staged.skipped) == ("stars", 1, [])
    assert caption_rows(staged.folder) == [["x_01.png", "a star"]]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"../evil.png": b"x"}, "unsafe path"),
        ({"/etc/evil.png": b"x"}, "unsafe path"),
    ],
)
def test_zips_with_unsafe_paths_are_refused(members, message, tmp_path):
    with pytest.raises(UploadError, match=message):
        stage_upload([make_zip(tmp_path / "bad.zip", members)], Outputs(tmp_path))
    assert not (tmp_path / "evil.png").exists() and list((tmp_path / "uploads").iterdir()) == []


def test_a_damaged_zip_is_refused(tmp_path):
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK not really")
    with pytest.raises(UploadError, match="can't be unpacked"):
        stage_upload([damaged], Outputs(tmp_path))


def test_a_zip_with_other_files_is_refused(tmp_path):
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK not really")
    with pytest.raises(UploadError, match="not both"):
        stage_upload([damaged, tmp_path / "a.png"], Outputs(tmp_path))


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


def test_caption_rows_list_each_image_with_its_caption(blob_folder):
    rows = caption_rows(blob_folder)
    assert [r[0] for r in rows] == ["a.png", "b.png", "c.jpg", "d.png"]
    assert rows[0][1] == "a sks blob on a white background" and rows[1][1] == ""


def test_edited_captions_are_written_back_and_only_for_the_folders_images(blob_folder, tmp_path):
    edited = [["a.png", ""], ["b.png", "  a  new\ncaption "], ["../../evil.png", "x"], ["c.jpg"]]
    assert save_captions(blob_folder, edited) == 2
    assert not (blob_folder / "a.txt").exists()
    assert (blob_folder / "b.txt").read_text() == "a new caption"
    assert not (tmp_path / "evil.txt").exists() and not (blob_folder.parent.parent / "evil.txt").exists()


def test_thumbnails_say_when_the_instance_prompt_stands_in_for_a_caption(blob_folder):
    save_captions(blob_folder, [["a.png", ""]])
    assert thumbnails(blob_folder)[0] == (
        str(blob_folder / "a.png"),
        "(no caption: the instance prompt is used)",
    )


def test_the_ledger_accepts_only_a_clients_own_uploads_and_deletes_them_once_used(tmp_path):
    mine, theirs = tmp_path / "mine.png", tmp_path / "theirs.png"
    mine.write_bytes(b"x")
    theirs.write_bytes(b"y")
    ledger = UploadLedger()
    ledger.record("me", [str(mine)])
    ledger.record("you", [str(theirs)])
    assert ledger.check("me", [str(mine), None]) == [mine]
    with pytest.raises(UploadError, match="theirs.png was not uploaded to this server"):
        ledger.check("me", [str(theirs)])
    ledger.discard("me", [str(mine), str(theirs)])  # another client's file is neither forgotten nor deleted
    assert not mine.exists() and theirs.exists()
    with pytest.raises(UploadError):
        ledger.check("me", [str(mine)])


def test_the_ledger_forgets_the_oldest_records_first(tmp_path):
    ledger = UploadLedger(capacity=2)
    ledger.record("me", ["/a", "/b", "/c"])
    assert ledger.check("me", ["/b", "/c"]) == [Path("/b"), Path("/c")]
    with pytest.raises(UploadError):
        ledger.check("me", ["/a"])


def test_old_uploads_no_run_used_are_cleaned_and_others_kept(tmp_path):
    outputs = Outputs(tmp_path)
    used, waiting, fresh, unused = (
        outputs.new_upload_dir(name) for name in ("used", "waiting", "fresh", "unused")
    )
    run = outputs.new_run_dir("used")
    (run / "config.json").write_text(json.dumps({"data_dir": str(used)}))
    adapter = outputs.adapter_file("kept")
    adapter.parent.mkdir()
    adapter.write_bytes(b"x")
    old = time.time() - UNUSED_UPLOAD_AGE_S - 60
    for folder in (used, waiting, unused):
        os.utime(folder, (old, old))
    assert clean_uploads(outputs, in_use=[str(waiting)]) == [unused]
    assert used.is_dir() and waiting.is_dir() and fresh.is_dir() and run.is_dir() and adapter.is_file()


def test_a_left_out_list_is_bounded_in_length(tmp_path):
    files = []
    for index in range(40):
        note = tmp_path / (f"{index:02d}-" + "n" * 300 + ".pdf")[:250]
        note.write_text("x")
        files.append(note)
    files.append(draw_blob(tmp_path / "a.png", (16, 16), (0, 0, 200)))
    staged = stage_upload(files, Outputs(tmp_path / "out"))
    assert len(staged.skipped) == 40 and "… and 30 more" in staged.left_out()
    assert len(staged.left_out()) < 1500


def test_a_caption_longer_than_the_limit_is_left_out_of_an_upload(tmp_path):
    image = draw_blob(tmp_path / "a.png", (16, 16), (0, 0, 200))
    caption = tmp_path / "a.txt"
    caption.write_text("tag, " * 10_000)
    staged = stage_upload([image, caption], Outputs(tmp_path / "out"))
    assert staged.skipped == ["a.txt: 0.0 MiB is too large for a caption (at most 16 KiB)"]


def dropped(tmp_path: Path, files: dict[str, bytes]) -> list[Path]:
    """Files as the page sends a dropped folder: each under its path inside it, parts joined by RELATIVE_SEP."""
    paths = []
    for index, (relative, data) in enumerate(files.items()):
        path = tmp_path / "cache" / str(index) / relative.replace("/", RELATIVE_SEP)
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def kohya_files(tmp_path: Path) -> dict[str, bytes]:
    def png(index: int) -> bytes:  # a different picture each: exact duplicates are left out
        return png_bytes(tmp_path, (0, 40 * index, 200))

    return {
        "my stars/10_sks star/a.png": png(0),
        "my stars/10_sks star/a.txt": b"a sks star, outlined",
        "my stars/10_sks star/b.png": png(1),
        "my stars/1_star/a.png": png(2),
        "my stars/extra/a.png": png(3),
        "my stars/extra/a.txt": b"an extra star",
        "my stars/c.png": png(4),
        "my stars/a.png": png(5),
    }


def test_a_dropped_kohya_folder_keeps_its_repeats_prompts_and_same_named_files(tmp_path):
    from sdlora.data import scan_folder

    staged = stage_upload(dropped(tmp_path, kohya_files(tmp_path)), Outputs(tmp_path))
    assert (staged.name, staged.images, staged.skipped) == ("my_stars", 6, [])
    items = {
        item.path.relative_to(staged.folder).as_posix(): item for item in scan_folder(staged.folder, "p")
    }
    assert {name: (item.caption, item.repeats) for name, item in items.items()} == {
        "a.png": ("p", 1),
        "c.png": ("p", 1),
        "extra_a.png": ("an extra star", 1),  # another sub-folder's a.png, renamed with its caption
        "10_sks star/a.png": ("a sks star, outlined", 10),
        "10_sks star/b.png": ("sks star", 10),
        "1_star/a.png": ("star", 1),
    }
    assert ["10_sks star/a.png", "a sks star, outlined"] in caption_rows(staged.folder)


def test_a_kohya_zip_keeps_its_sub_folders(tmp_path):
    members = {name.removeprefix("my stars/"): data for name, data in kohya_files(tmp_path).items()}
    staged = stage_upload([make_zip(tmp_path / "stars.zip", members)], Outputs(tmp_path))
    assert (staged.name, staged.images) == ("stars", 6)
    assert (staged.folder / "10_sks star" / "b.png").is_file() and (
        staged.folder / "1_star" / "a.png"
    ).is_file()


def test_an_empty_dropped_folder_gets_a_message(tmp_path):
    marker = tmp_path / EMPTY_FOLDER
    marker.write_bytes(b"")
    with pytest.raises(UploadError, match="has no files"):
        stage_upload([marker], Outputs(tmp_path))


def test_messages_name_files_by_their_path_in_the_upload_not_the_server_s(tmp_path):
    files = {
        "set/sub/notes.pdf": b"%PDF",
        "set/sub/broken.png": b"not a png",
        "set/ok.png": png_bytes(tmp_path),
    }
    staged = stage_upload(dropped(tmp_path, files), Outputs(tmp_path))
    assert staged.skipped[0] == "sub/notes.pdf: not an image or a .txt caption"
    assert staged.skipped[1].startswith("broken.png: can't be read as an image")
    assert str(tmp_path) not in " ".join(staged.skipped)


def test_a_dropped_kohya_folder_leaves_out_zero_repeat_folders_and_duplicates(tmp_path):
    files = kohya_files(tmp_path)
    files["my stars/0_unused/z.png"] = files["my stars/c.png"]
    files["my stars/0_unused/y.png"] = files["my stars/a.png"]
    files["my stars/10_sks star/copy.png"] = files["my stars/c.png"]
    staged = stage_upload(dropped(tmp_path, files), Outputs(tmp_path))
    assert staged.images == 6 and not (staged.folder / "0_unused").exists()
    assert staged.skipped == [
        "0_unused/: a kohya folder with 0 repeats is never trained on",
        "10_sks star/copy.png: the same picture as c.png",
    ]
