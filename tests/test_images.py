"""Decoding every format to uint8, resizing, the on-disk cache, transforms and the Dataset."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlib.errors import CXRError
from cxrlib.images import CXRDataset, ImageCache, decode_image, make_transform, resize_square
from helpers import write_dicom


def noise_image(seed: int, shape=(24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_8bit_png_and_jpeg_keep_values(tmp_path):
    img = noise_image(0)
    Image.fromarray(img).save(tmp_path / "a.png")
    assert np.array_equal(decode_image(tmp_path / "a.png"), img)
    Image.fromarray(np.full((20, 30), 77, np.uint8)).save(tmp_path / "b.jpeg", quality=95)
    out = decode_image(tmp_path / "b.jpeg")
    assert out.dtype == np.uint8 and out.shape == (20, 30) and abs(int(out.mean()) - 77) <= 1


def test_16bit_png_is_stretched_to_uint8(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 32).astype(np.uint16), (8, 1))  # 12-bit data in 16 bits
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = decode_image(tmp_path / "deep.png")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # order kept


def test_rgb_rgba_and_palette(tmp_path):
    gray = noise_image(1)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    assert np.array_equal(decode_image(tmp_path / "rgb.png"), gray)

    rgba = np.dstack([np.stack([gray] * 3, -1), np.full(gray.shape, 255, np.uint8)])
    rgba[:4, :, 3] = 0  # transparent band -> black, the X-ray background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = decode_image(tmp_path / "rgba.png")
    assert np.all(out[:4] == 0) and np.array_equal(out[4:], gray[4:])

    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    assert np.abs(decode_image(tmp_path / "palette.png").astype(int) - gray).max() <= 8


def test_dicom_rescale_and_window_applied(tmp_path):
    raw = np.tile(np.arange(0, 1001, 10, dtype=np.uint16), (4, 1))  # 0..1000
    # HU = 2 * raw - 1000 (-1000..1000); window [-500, 500] saturates raw < 250 and raw > 750.
    write_dicom(tmp_path / "ct.dcm", raw, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=1000)
    out = decode_image(tmp_path / "ct.dcm")
    assert out.dtype == np.uint8 and out.shape == raw.shape
    col = {int(v): int(o) for v, o in zip(raw[0], out[0])}
    assert col[100] == col[200] == 0 and col[800] == col[1000] == 255
    assert 150 < col[600] < 210  # HU 200 sits 70% up the window; without the rescale it would be 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    raw = np.tile(np.linspace(0, 4000, 16).astype(np.uint16), (4, 1))
    write_dicom(tmp_path / "m2.dcm", raw)
    write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1")
    m2, m1 = decode_image(tmp_path / "m2.dcm"), decode_image(tmp_path / "m1.dcm")
    assert m2[0, 0] == 0 and m2[0, -1] == 255
    assert np.array_equal(m1.astype(int), 255 - m2.astype(int))


@pytest.mark.parametrize(
    "name, content",
    [("empty.png", b""), ("garbage.jpg", b"not an image at all" * 10), ("broken.dcm", b"\0" * 128 + b"DICM" + b"\1" * 50)],
)
def test_bad_files_raise_cxrerror_naming_the_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CXRError, match=name):
        decode_image(tmp_path / name)


def test_truncated_jpeg_raises(tmp_path):
    Image.fromarray(noise_image(2, (64, 64))).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CXRError, match="cut.jpg"):
        decode_image(tmp_path / "cut.jpg")


def test_resize_square_squashes():
    out = resize_square(noise_image(3, (30, 50)), 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8


def write_images(folder, n: int, start: int = 0) -> list[str]:
    paths = []
    for i in range(start, start + n):
        Image.fromarray(noise_image(i, (20 + i % 5, 24))).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


def test_cache_decodes_once_across_runs(tmp_path):
    paths = write_images(tmp_path, 6)
    first = ImageCache(16, root=tmp_path / "cache")
    a, skipped = first.load(paths)
    assert a.shape == (6, 16, 16) and not skipped and first.decoded_count == 6
    again = ImageCache(16, root=tmp_path / "cache")  # a later run
    b, _ = again.load(paths)
    assert again.decoded_count == 0 and np.array_equal(a, b)
    assert np.array_equal(b[2], resize_square(decode_image(paths[2]), 16))
    more = paths + write_images(tmp_path, 3, start=6)  # appending: only the new files are decoded
    c, _ = again.load(more)
    assert again.decoded_count == 3 and np.array_equal(c[:6], a)
    assert ImageCache(32, root=tmp_path / "cache").load(paths[:2])[0].shape == (2, 32, 32)  # sizes are separate


def test_cache_keys_by_content_not_name(tmp_path):
    paths = write_images(tmp_path, 2)
    (tmp_path / "renamed.png").write_bytes((tmp_path / "img0.png").read_bytes())
    cache = ImageCache(8, root=tmp_path / "cache")
    images, _ = cache.load(paths + [str(tmp_path / "renamed.png")])
    assert cache.decoded_count == 2 and np.array_equal(images[0], images[2])


def test_cache_notices_a_changed_file(tmp_path):
    paths = write_images(tmp_path, 2)
    ImageCache(8, root=tmp_path / "cache").load(paths)
    Image.fromarray(noise_image(99, (20, 24))).save(paths[0])  # same path, new content
    os.utime(paths[0], ns=(1, 1))
    cache = ImageCache(8, root=tmp_path / "cache")
    images, _ = cache.load(paths)
    assert cache.decoded_count == 1 and np.array_equal(images[0], resize_square(decode_image(paths[0]), 8))


def test_cache_skips_unreadable_files_with_reasons(tmp_path):
    paths = write_images(tmp_path, 3)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    mixed = [paths[0], str(tmp_path / "zero.png"), paths[1], str(tmp_path / "bad.jpg"),
             str(tmp_path / "gone.png"), paths[2]]  # fmt: skip
    images, skipped = ImageCache(8, root=tmp_path / "cache").load(mixed)
    assert images.shape == (3, 8, 8)
    assert sorted(p for p, _ in skipped) == sorted(str(tmp_path / n) for n in ("gone.png", "zero.png", "bad.jpg"))
    assert all(reason for _, reason in skipped)


def test_cache_ignores_a_torn_index_line(tmp_path):
    paths = write_images(tmp_path, 2)
    cache = ImageCache(8, root=tmp_path / "cache")
    ref, _ = cache.load(paths)
    with open(cache.index_path, "a") as f:  # a crash in the middle of an append
        f.write("0123456789abcdef0123456789abcdef01234567\t9")
    again = ImageCache(8, root=tmp_path / "cache")
    out, _ = again.load(paths)
    assert again.decoded_count == 0 and np.array_equal(out, ref)


def test_transforms_match_the_input_specs():
    img = np.full((16, 16), 255, np.uint8)
    img[:, :8] = 0
    x = make_transform("xrv")(img)
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0, 0], torch.tensor(-1024.0)) and torch.allclose(x[0, 0, -1], torch.tensor(1024.0))
    y = make_transform("imagenet")(img)
    assert y.shape == (3, 16, 16)
    assert torch.allclose(y[:, 0, -1], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    torch.manual_seed(0)
    aug = make_transform("imagenet", train=True)
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    assert aug(noisy).shape == (3, 32, 32) and not torch.equal(aug(noisy), make_transform("imagenet")(noisy))
    plain = make_transform("imagenet", train=True, augment=False)
    assert torch.equal(plain(noisy), make_transform("imagenet")(noisy))
    with pytest.raises(CXRError, match="input spec"):
        make_transform("rgb")


def test_dataset_reports_and_drops_unreadable_rows(tmp_path):
    paths = write_images(tmp_path, 3)
    (tmp_path / "cut.png").write_bytes((tmp_path / "img0.png").read_bytes()[:40])
    table = pd.DataFrame({"path": [paths[0], str(tmp_path / "cut.png"), paths[1], paths[2]],
                          "label": ["covid", "normal", "pneumonia", "normal"]})  # fmt: skip
    with pytest.warns(UserWarning, match="unreadable"):
        ds = CXRDataset(table, "multiclass", ImageCache(16, root=tmp_path / "cache"), make_transform("xrv"))
    assert len(ds) == 3 and [p for p, _ in ds.skipped] == [str(tmp_path / "cut.png")]
    x, label, index = ds[1]
    assert x.shape == (1, 16, 16) and label == 1 and index == 1 and ds.table.loc[index, "path"] == paths[1]
    binary = CXRDataset(table.drop(index=1), "binary", ImageCache(16, root=tmp_path / "cache"))
    assert binary.labels.tolist() == [1, 0, 0] and binary[0][0].shape == (3, 16, 16)
