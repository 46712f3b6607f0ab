"""The bundle's numpy image transform against Pillow's resize and open_clip's torchvision transform, on real
images (a photograph shipped with matplotlib, rendered openclipart SVGs) and drawn ones."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from mmft.bundle.preprocess import preprocess_config, preprocess_image, resize

PHOTO = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def _clipart(n: int = 3) -> list[Image.Image]:
    """A few openclipart SVGs rendered on white (skipped where the Debian package or cairosvg is missing)."""
    cairosvg = pytest.importorskip("cairosvg")
    root = Path("/usr/share/openclipart/svg")
    if not root.is_dir():
        pytest.skip("openclipart-svg is not installed")
    out = []
    for svg in sorted(root.glob("*/*.svg"))[::400]:
        try:
            png = cairosvg.svg2png(url=str(svg), output_width=173, background_color="white")
            out.append(Image.open(io.BytesIO(png)).convert("RGB"))
        except Exception as e:  # noqa: BLE001 (a few SVGs do not render: take the next)
            print(f"skipped {svg}: {e}")
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(PHOTO) as im:
        return im.convert("RGB")  # 512 x 600 JPEG photograph


def _pil_resize(img: Image.Image, size, interpolation: str) -> np.ndarray:
    return np.asarray(img.resize((size[1], size[0]), getattr(Image.Resampling, interpolation.upper())))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_numpy_resize_equals_pillow_byte_for_byte(photo, interpolation):
    rng = np.random.default_rng(0)
    sizes = [(160, 137), (600, 700), (37, 29), (1, 5), (512, 80), (90, 600)]  # down, up, mixed, extreme
    sources = [photo] + [photo.resize(tuple(int(v) for v in rng.integers(20, 300, 2))) for _ in range(6)]
    for src in sources:
        arr = np.asarray(src)
        for size in sizes + [tuple(int(v) for v in rng.integers(4, 300, 2)) for _ in range(4)]:
            ours = resize(arr, size, interpolation, pillow_order=PILLOW_13)
            assert ours.shape == (*size, 3)
            assert np.array_equal(ours, _pil_resize(src, size, interpolation)), (src.size, size)


def test_pass_order_matters_where_the_height_shrinks_most(photo):
    """The case Pillow >= 13 resizes vertically first: the other order is off by a level or two."""
    arr = np.asarray(photo.resize((90, 250)))
    a = resize(arr, (160, 160), pillow_order=True)
    b = resize(arr, (160, 160), pillow_order=False)
    assert 0 < np.abs(a.astype(int) - b).max() <= 8


def _open_clip_transform(size, mode, mean, std, interpolation="bicubic", fill=0):
    from open_clip.transform import image_transform

    return image_transform(size, is_train=False, mean=mean, std=std, resize_mode=mode,
                           interpolation=interpolation, fill_color=fill)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [160, (96, 128)])
def test_transform_matches_open_clip(photo, mode, size):
    if mode == "shortest" and not isinstance(size, int) and not PILLOW_13:
        pytest.skip("needs Pillow >= 13's pass order")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ref = _open_clip_transform(size, mode, mean, std, fill=7)
    cfg = preprocess_config({"size": size, "resize_mode": mode, "mean": mean, "std": std, "fill_color": 7})
    images = [photo, photo.resize((300, 100)), photo.resize((90, 250)), photo.crop((0, 0, 161, 161)),
              Image.new("RGB", (33, 47), (200, 10, 90))]
    for im in images:
        want = ref(im).numpy()  # (3, H, W)
        got = preprocess_image(im, cfg)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=str(im.size))
        got_np = preprocess_image(np.asarray(im), cfg)  # the numpy reference resize
        if PILLOW_13:
            np.testing.assert_array_equal(got_np, got)


def test_transform_matches_open_clip_on_rendered_clipart():
    images = _clipart()
    ref = _open_clip_transform(160, "shortest", (0.5,) * 3, (0.5,) * 3)
    cfg = preprocess_config({"size": 160, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    for im in images:
        np.testing.assert_allclose(preprocess_image(im, cfg), ref(im).numpy(), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(preprocess_image(np.asarray(im), cfg), preprocess_image(im, cfg))


def test_model_preprocess_cfg_round_trip(tiny_vit_cfg, photo):
    """preprocess.json made from a model's preprocess_cfg reproduces that model's own preprocess_val."""
    from mmft.model.factory import create_model

    model, _, preprocess_val, _ = create_model(tiny_vit_cfg)
    cfg = preprocess_config(dict(model.visual.preprocess_cfg))
    np.testing.assert_allclose(preprocess_image(photo, cfg), preprocess_val(photo).numpy(), rtol=0, atol=1e-6)
    rgba = photo.convert("RGBA")
    np.testing.assert_allclose(preprocess_image(rgba, cfg), preprocess_val(photo).numpy(), rtol=0, atol=1e-6)


def test_bad_inputs_are_sentences():
    cfg = preprocess_config({"size": 32})
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess_image(np.zeros((8, 8), np.float32), cfg)
    with pytest.raises(ValueError, match="PIL image"):
        preprocess_image("not an image", cfg)
    with pytest.raises(ValueError, match="resize mode"):
        preprocess_config({"size": 32, "resize_mode": "random"})
