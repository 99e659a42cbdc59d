"""Training folders: captions, kohya repeats, image fixes, buckets and bad files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from sdlora.data import (
    Bucket,
    DataError,
    ImageError,
    assign_bucket,
    bucket_batches,
    fit_to_bucket,
    load_image,
    make_buckets,
    read_caption,
    scan_folder,
)
from sdlora.data.folder import MAX_CAPTION_BYTES
from tests.conftest import draw_blob


def test_captions_and_instance_prompt(blob_folder):
    items = {item.path.name: item for item in scan_folder(blob_folder, "a photo of sks blob")}
    assert set(items) == {"a.png", "b.png", "c.jpg", "d.png"}
    assert items["a.png"].caption == "a sks blob on a white background"
    assert items["b.png"].caption == "a photo of sks blob"


def test_kohya_folders_give_repeats_and_default_prompt(tmp_path):
    sub = tmp_path / "10_sks dog"
    sub.mkdir()
    draw_blob(sub / "x.png", (16, 16), (0, 0, 0))
    draw_blob(sub / "y.png", (16, 16), (0, 0, 0), caption="sks dog running")
    items = {i.path.name: i for i in scan_folder(tmp_path, None)}
    assert items["x.png"].repeats == 10 and items["x.png"].caption == "sks dog"
    assert items["y.png"].caption == "sks dog running"


def test_caption_encodings(tmp_path):
    image = draw_blob(tmp_path / "a.png", (8, 8), (0, 0, 0))
    for raw, expected in [
        ("un café\n".encode("utf-8-sig"), "un café"),
        ("ein Bär".encode("utf-16"), "ein Bär"),
        ("déjà vu".encode("latin-1"), "déjà vu"),
        (b"  many \n  spaces  ", "many spaces"),
    ]:
        image.with_suffix(".txt").write_bytes(raw)
        assert read_caption(image) == expected


def test_empty_folder_fails_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="No usable images"):
        scan_folder(tmp_path, "x")


def test_undecodable_image_is_skipped_with_a_warning_naming_it(blob_folder, caplog):
    (blob_folder / "broken.png").write_bytes(b"<html>not an image</html>")
    with caplog.at_level(logging.WARNING):
        items = scan_folder(blob_folder, "x")
    assert "broken.png" not in {i.path.name for i in items}
    assert "broken.png" in caplog.text


def test_exif_rotation_and_transparency(tmp_path):
    # A 20x10 image whose EXIF says "rotate 90°" must come out 10x20.
    image = Image.new("RGB", (20, 10), "red")
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (10, 20)
    # Fully transparent pixels become white, not black.
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    # A palette image with a transparent index too.
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.save(tmp_path / "pal.png", transparency=0)
    assert load_image(tmp_path / "pal.png").getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_png_keeps_its_tones(tmp_path):
    array = np.full((4, 4), 32768, dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    value = load_image(tmp_path / "deep.png").getpixel((0, 0))[0]
    assert 120 <= value <= 135


def test_corrupt_file_error_names_the_file(tmp_path):
    path = tmp_path / "half.png"
    draw_blob(path, (64, 64), (1, 2, 3))
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImageError, match="half.png"):
        load_image(path)


def test_buckets_keep_aspect_ratio():
    buckets = make_buckets(512, 64)
    assert Bucket(512, 512) in buckets
    assert all(b.width % 64 == 0 and b.height % 64 == 0 and b.width * b.height <= 512 * 512 for b in buckets)
    wide = assign_bucket(1920, 1080, buckets)
    assert wide.width > wide.height and abs(wide.aspect - 16 / 9) < 0.2
    assert assign_bucket(1000, 1000, buckets) == Bucket(512, 512)


def test_fit_to_bucket_crops_little():
    image = Image.new("RGB", (300, 100), "white")
    image.paste((255, 0, 0), (0, 0, 10, 100))  # a red stripe at the left edge
    fitted = fit_to_bucket(image, Bucket(96, 32))
    assert fitted.size == (96, 32)
    assert fitted.getpixel((0, 16))[1] < 100  # the edge survived: no blind centre crop to a square


def test_batches_stay_within_a_bucket_and_are_deterministic():
    buckets = [Bucket(8, 8), Bucket(8, 8), Bucket(16, 8), Bucket(8, 8)]
    first = bucket_batches(buckets, [1, 2, 1, 1], 2, seed=3)
    batches = [next(first) for _ in range(10)]
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    second = bucket_batches(buckets, [1, 2, 1, 1], 2, seed=3)
    assert batches == [next(second) for _ in range(10)]


def test_zero_repeat_kohya_folders_and_duplicates_are_reported(tmp_path, caplog):
    root = tmp_path / "set"
    (root / "0_reg").mkdir(parents=True)
    draw_blob(root / "a.png", (16, 16), (0, 0, 200), caption="a blob")
    (root / "copy.png").write_bytes((root / "a.png").read_bytes())
    draw_blob(root / "0_reg" / "r.png", (16, 16), (200, 0, 0), caption="a reg")
    items = scan_folder(root, "a blob")
    assert sorted(item.path.name for item in items) == ["a.png", "copy.png"]
    assert "Leaving out 0_reg" in caplog.text and "copy.png is the same picture as a.png" in caplog.text


@pytest.mark.parametrize(("size", "message"), [((1, 2000), "too long and thin"), ((9000, 8000), "too large")])
def test_images_needing_too_much_memory_are_refused_from_their_header(tmp_path, size, message):
    path = tmp_path / "big.png"
    Image.new("L", size).save(path)
    with pytest.raises(ImageError, match=f"big.png: {size[0]}x{size[1]} is {message}"):
        load_image(path)


def test_a_huge_caption_is_read_only_in_part(tmp_path):
    image = draw_blob(tmp_path / "a.png", (16, 16), (0, 0, 200))
    image.with_suffix(".txt").write_text("word " * 1_000_000)
    assert len(read_caption(image)) <= MAX_CAPTION_BYTES
