"""Uploaded images as users send them (sega.images) and the checks on the upload (server.images)."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

from sega.images import fit_size, load_image
from server.images import read_upload, upload_path
from server.params import InvalidInput

MB, PIXELS = 5, 2_000_000


def save(image: PIL.Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def read(path, size=32):
    return read_upload(path, size, MB, PIXELS)


def error(path) -> str:
    with pytest.raises(InvalidInput) as info:
        read(path)
    return str(info.value)


@pytest.mark.parametrize("w, h, size, want", [(64, 64, 32, (32, 32)), (100, 50, 32, (32, 16)), (50, 100, 32, (16, 32)),
                                              (300, 20, 32, (32, 8)), (32, 32, 32, (32, 32)), (512, 384, 32, (32, 24)),
                                              (4032, 3024, 512, (512, 384)), (1000, 333, 512, (512, 168)),
                                              (3000, 20, 512, (512, 8))])
def test_the_longer_side_becomes_the_native_size_and_sides_are_multiples_of_8(w, h, size, want):
    assert fit_size(w, h, size) == want


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_png_jpeg_and_webp_are_read_and_resized_with_a_notice(tmp_path, fmt, suffix):
    path = save(PIL.Image.new("RGB", (96, 48), (200, 30, 30)), tmp_path / f"a.{suffix}", format=fmt)
    image, notes = read(path)
    assert image.mode == "RGB" and image.size == (32, 16)
    assert any("resized from 96×48 to 32×16" in n for n in notes)
    assert np.abs(np.asarray(image, dtype=int) - (200, 30, 30)).max() < 12


def test_an_image_already_at_the_native_size_gets_no_notice(tmp_path):
    image, notes = read(save(PIL.Image.new("RGB", (32, 32), "blue"), tmp_path / "a.png"))
    assert image.size == (32, 32) and notes == []


def test_exif_orientation_is_applied(tmp_path):
    # A 64x32 picture whose EXIF says "rotate 90°": it is shown (and must be edited) as 32x64.
    image = PIL.Image.new("RGB", (64, 32), "white")
    image.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = PIL.Image.Exif()
    exif[274] = 6
    path = save(image, tmp_path / "rot.jpg", format="JPEG", exif=exif.tobytes(), quality=95)
    out, _ = read(path)
    assert out.size == (16, 32)
    pixels = np.asarray(out, dtype=int)
    assert pixels[4, 8, 0] > 200 and pixels[4, 8, 1] < 60  # after rotation the red half is on top
    assert pixels[-4, 8].min() > 200


def test_alpha_is_flattened_on_white(tmp_path):
    image = PIL.Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (8, 8, 24, 24))
    out, notes = read(save(image, tmp_path / "a.png"))
    pixels = np.asarray(out)
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[16, 16]) == (0, 0, 255)
    assert any("white" in n for n in notes)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "LA", "1"])
def test_other_modes_are_converted_to_rgb(tmp_path, mode):
    base = PIL.Image.new("RGB", (40, 40), (120, 120, 120))
    image = base.convert("I").convert("I;16") if mode == "I;16" else base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out, _ = read(save(image, tmp_path / f"a.{fmt.lower()}", format=fmt))
    assert out.mode == "RGB" and out.size == (32, 32)


def test_an_animation_uses_its_first_frame(tmp_path):
    frames = [PIL.Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    path = tmp_path / "anim.webp"
    frames[0].save(path, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    out, notes = read(path)
    assert tuple(np.asarray(out)[16, 16]) == (255, 0, 0)
    assert any("first frame" in n for n in notes)


def test_a_pil_image_works_in_the_library_too():
    out, _ = load_image(PIL.Image.new("L", (100, 100), 30), 64)
    assert out.mode == "RGB" and out.size == (64, 64)


def test_not_an_image_is_refused_naming_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    assert error(path).startswith("image is not a PNG, JPEG or WebP image")


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert error(path) == "image: the file is empty"


def test_a_truncated_file_is_refused(tmp_path):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert error(path).startswith("image could not be read")


def test_other_formats_are_refused_naming_the_allowed_ones(tmp_path):
    path = save(PIL.Image.new("RGB", (32, 32)), tmp_path / "a.bmp", format="BMP")
    assert error(path) == "image must be a PNG, JPEG or WebP file; got BMP"


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    # 6000 x 6000 one-bit pixels compress to a few kB; decoded they would be 36 megapixels.
    path = save(PIL.Image.new("1", (6000, 6000)), tmp_path / "bomb.png")
    assert path.stat().st_size < 100_000
    assert error(path) == f"image has 6000×6000 = 36000000 pixels; at most {PIXELS} allowed"


def test_a_file_over_the_size_limit_is_refused(tmp_path):
    noise = np.random.default_rng(1).integers(0, 255, (1400, 1400, 3), dtype=np.uint8)
    path = save(PIL.Image.fromarray(noise), tmp_path / "big.png")
    assert path.stat().st_size > MB * 1024 * 1024
    assert error(path).startswith(f"image must be at most {MB} MB")


def test_only_uploaded_files_are_read(tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    inside = save(PIL.Image.new("RGB", (8, 8)), uploads / "a.png")
    assert upload_path({"path": str(inside), "meta": {"_type": "gradio.FileData"}}, [uploads]) == inside
    assert upload_path(str(inside), [uploads]) == inside
    outside = save(PIL.Image.new("RGB", (8, 8)), tmp_path / "secret.png")
    for payload, message in [({"path": str(outside)}, "image must be a file uploaded to this app"),
                             ({"path": str(uploads / ".." / "secret.png")}, "image must be a file uploaded to this app"),
                             ({"path": str(uploads / "gone.png")}, "image: the uploaded file is missing"),
                             (None, "image is required"), (42, "image must be an uploaded file")]:
        with pytest.raises(InvalidInput) as info:
            upload_path(payload, [uploads])
        assert str(info.value).startswith(message)


def test_masks_travel_as_png_data_urls_and_tint_the_image():
    from server.images import MASK_COLOR, mask_from_data_url, mask_overlay, mask_overlays, mask_to_data_url

    mask = np.zeros((4, 4), np.float32)
    mask[:2, :2] = 1.0
    mask[3, 3] = 0.5
    url = mask_to_data_url(mask)
    assert url.startswith("data:image/png;base64,")
    np.testing.assert_allclose(mask_from_data_url(url), mask, atol=1 / 255)
    image = PIL.Image.new("RGB", (8, 8), (255, 255, 255))
    tinted = np.asarray(mask_overlay(image, mask, strength=1.0))
    assert tuple(tinted[0, 0]) == MASK_COLOR and tuple(tinted[7, 0]) == (255, 255, 255)  # nearest 2x2 blocks
    with pytest.raises(ValueError, match="data URL"):
        mask_from_data_url("not a mask")
    assert mask_overlays(None, [{"concept": "blue", "mask": url}]) == []
