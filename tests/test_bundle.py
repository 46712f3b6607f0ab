"""Bundles: ONNX encoders equal to the adapted torch model for both tower families, manifest refusal, int8,
the index inside, and a model card whose figures are mmft's evaluation of the same sets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, adapted_run_dir, make_pairs

import mmft
from mmft.bundle.manifest import BundleError
from mmft.bundle.writer import export_bundle, write_bundle

CAPTIONS = ["a red apple", "A photo of TWO dogs playing in the snow, seen from far away on a cold day", "x",
            "café & crème", "a blue circle on a grey ground"]
PHOTO = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _images(size: int = 48) -> list:
    from PIL import Image

    with Image.open(PHOTO) as im:
        photo = im.convert("RGB")
    return [photo, photo.resize((90, 250))] + [p[0] for p in make_pairs(5, size=size, seed=3)]


def _random_lora(model, std: float, seed: int = 0) -> None:
    from mmft.config import LoraConfig
    from mmft.model.lora import apply_lora

    apply_lora(model, LoraConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.eval()


def _torch_rows(model, tokenizer, preprocess, scale: float):
    from mmft.model.lora import lora_scale

    with torch.no_grad(), lora_scale(model, scale):
        text = model.encode_text(tokenizer(CAPTIONS), normalize=True).numpy()  # (T, D)
        image = model.encode_image(torch.stack([preprocess(i) for i in _images()]), normalize=True).numpy()
    return text, image


def _min_cos(a, b) -> float:
    return float(np.sum(a.astype(np.float64) * b, axis=1).min())


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """mmft-mini (EfficientNet-Lite0 + MiniLM: a Hugging Face text tower), random adapter, bundled at 0.5."""
    from mmft.config import ModelConfig
    from mmft.model.factory import create_model

    model, _, preprocess, tok = create_model(ModelConfig(name="mmft-mini"))
    _random_lora(model, std=0.05)
    out = write_bundle(model, tok, preprocess, tmp_path_factory.mktemp("mini") / "bundle", lora_scale=0.5)
    return model, tok, preprocess, out


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny random open_clip ViT with open_clip's own text transformer and BPE, bundled at scale 1."""
    from mmft.config import ModelConfig
    from mmft.model.factory import create_model

    torch.manual_seed(0)
    model, _, preprocess, tok = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))
    _random_lora(model, std=0.3)
    out = write_bundle(model, tok, preprocess, tmp_path_factory.mktemp("vit") / "bundle")
    return model, tok, preprocess, out


@pytest.mark.parametrize("family", ["mini", "vit"])
def test_every_row_matches_the_adapted_torch_model(family, request):
    model, tok, preprocess, out = request.getfixturevalue(family)
    bundle = mmft.load_bundle(out)
    scale = bundle.manifest["lora_scale"]
    text, image = _torch_rows(model, tok, preprocess, scale)
    assert _min_cos(text, bundle.encode_text(CAPTIONS)) >= 0.9999
    assert _min_cos(image, bundle.encode_image(_images())) >= 0.9999
    # one caption at a time (batch 1, shortest sequence) gives the same rows as the batch
    single = np.concatenate([bundle.encode_text([c]) for c in CAPTIONS])
    assert _min_cos(text, single) >= 0.9999
    # the merged adapter is the one at that scale: the frozen base embeds differently
    base_text, _ = _torch_rows(model, tok, preprocess, 0.0)
    assert _min_cos(base_text, bundle.encode_text(CAPTIONS)) < 0.999


def test_export_leaves_the_model_as_it_was(mini):
    from mmft.model.lora import get_lora_scale

    model = mini[0]
    assert get_lora_scale(model) == 1.0 and model.mmft_lora is not None


def test_sequence_axis_is_dynamic_only_for_hugging_face_towers(mini, vit):
    m_mini = mmft.load_bundle(mini[3]).manifest
    m_vit = mmft.load_bundle(vit[3]).manifest
    e_mini, e_vit = m_mini["encoders"], m_vit["encoders"]
    assert e_mini["dynamic_sequence"] and e_mini["text"]["input_shape"][1] == "sequence"
    assert not e_vit["dynamic_sequence"] and e_vit["text"]["input_shape"][1] == 16
    assert m_mini["tokenizer"]["pad_to"] == "longest" and m_vit["tokenizer"]["pad_to"] == "context"


def test_manifest_records_identity_scale_dims_and_fingerprint(mini):
    from mmft.embeddings import model_fingerprint
    from mmft.model.adapter import adapter_digest
    from mmft.model.lora import lora_scale

    model, _, _, out = mini
    m = mmft.load_bundle(out).manifest
    with lora_scale(model, 0.5):
        assert m["fingerprint"] == json.loads(json.dumps(model_fingerprint(model)))
    assert m["adapter_sha256"] == adapter_digest(model) and m["lora_scale"] == 0.5
    assert m["base_model"]["name"] == "mmft-mini"
    assert m["encoders"]["dim"] == 256 and m["encoders"]["opset"] == 17
    assert set(m["files"]) == {"image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "preprocess.json",
                               "README.md"}


def test_altered_bundles_are_refused(vit, tmp_path):
    src = vit[3]

    def fresh(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    flipped = fresh("flipped")
    data = bytearray((flipped / "text_encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "text_encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="text_encoder.onnx does not match the sha256"):
        mmft.load_bundle(flipped)
    mmft.load_bundle(flipped, verify=False)  # an explicit opt-out still opens it

    missing = fresh("missing")
    (missing / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        mmft.load_bundle(missing)
    extra = fresh("extra")
    (extra / "other.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="not in the manifest"):
        mmft.load_bundle(extra)
    unfinished = fresh("unfinished")
    (unfinished / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        mmft.load_bundle(unfinished)
    with pytest.raises(BundleError, match="no 'int8' encoders"):
        mmft.load_bundle(src, precision="int8")


def _shards(root: Path, n: int = 24) -> list[str]:
    from mmft.data.shard_writer import make_shards

    src = root / "src"
    src.mkdir(parents=True)
    for i, (image, caption, _) in enumerate(make_pairs(n, size=48, seed=1)):
        image.save(src / f"im{i:03d}.png")
        (src / f"im{i:03d}.txt").write_text(f"{caption}\n{caption} number {i}\n")
    make_shards(src, root / "shards", samples_per_shard=12, progress=False)
    return [str(p) for p in sorted((root / "shards").glob("*.tar"))]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A tiny run, gallery shards and an index built at LoRA scale 0.5; then a bundle with all of it."""
    from mmft.config import DataConfig, EvalConfig, IndexConfig
    from mmft.index.core import build_index_from_run

    root = tmp_path_factory.mktemp("deployed")
    run, _, _, _ = adapted_run_dir(root, seed=5)
    shards = _shards(root)
    data_cfg = DataConfig(num_workers=0)
    index_cfg = IndexConfig(factory="Flat", use_gpu="never", lora_scale=0.5)
    build_index_from_run(run, shards, root / "index", index_cfg, data_cfg=data_cfg, progress=False)
    eval_cfg = EvalConfig(domain=shards[:1], general=shards[1:], bootstrap=200, lora_scales=[0.0, 0.5, 1.0])
    out = export_bundle(run, root / "bundle", lora_scale=0.5, quantize="int8", index_dir=root / "index",
                        eval_cfg=eval_cfg, data_cfg=data_cfg, progress=False)
    return {"root": root, "run": run, "shards": shards, "eval_cfg": eval_cfg, "data_cfg": data_cfg,
            "bundle": out}


def test_int8_encoders_stay_close_to_fp32(deployed):
    int8 = mmft.load_bundle(deployed["bundle"])
    fp32 = mmft.load_bundle(deployed["bundle"], precision="fp32")
    assert int8.precision == "int8" and int8.manifest["quantization"]["image"]["calibration_images"] == 24
    assert _min_cos(fp32.encode_text(CAPTIONS), int8.encode_text(CAPTIONS)) > 0.99
    assert _min_cos(fp32.encode_image(_images()), int8.encode_image(_images())) > 0.99
    files = int8.manifest["encoders"]["files"]["int8"]
    size = {name: (deployed["bundle"] / name).stat().st_size for name in (files["text"], "text_encoder.onnx")}
    assert size[files["text"]] < size["text_encoder.onnx"]


def test_shipped_index_answers_like_the_torch_index(deployed):
    from mmft.index.core import load_index, query_index
    from mmft.index.manifest import check_fingerprint

    bundle = mmft.load_bundle(deployed["bundle"], precision="fp32")
    index = load_index(bundle.index_dir)
    check_fingerprint(index.manifest, bundle.fingerprint(), str(bundle.index_dir))
    got = index.search(bundle.encode_text(CAPTIONS), k=10)[1]
    want = [[h["id"] for h in hits] for hits in query_index(deployed["root"] / "index", text=CAPTIONS, k=10)]
    assert [list(r) for r in got] == want
    thumbs = (deployed["root"] / "index" / "thumbs.json").is_file()
    assert (bundle.index_dir / "thumbs.json").is_file() == thumbs


def test_an_index_of_another_scale_is_refused(deployed, tmp_path):
    from mmft.index.core import StaleIndexError

    with pytest.raises(StaleIndexError, match="LoRA scale"):
        export_bundle(deployed["run"], tmp_path / "b", lora_scale=1.0, index_dir=deployed["root"] / "index")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))  # nothing half-written is left


def test_card_figures_are_the_evaluation_of_the_same_sets(deployed):
    """The manifest's and README's recall equal an independent `mmft.evaluate` of the same model and sets."""
    from mmft.evaluation.core import EvalRow, evaluate
    from mmft.model.adapter import load_model

    model, preprocess, tok = load_model(deployed["run"])
    cfg = deployed["eval_cfg"]
    sets = {"domain": cfg.domain, "general": cfg.general}
    rows = [EvalRow("baseline", 0.0), EvalRow("tuned", 1.0), EvalRow("exported @ scale 0.5", 0.5)]
    report = evaluate(model, sets, tokenizer=tok, preprocess=preprocess, eval_cfg=cfg,
                      data_cfg=deployed["data_cfg"], rows=rows, progress=False)
    m = mmft.load_bundle(deployed["bundle"]).manifest
    card = (deployed["bundle"] / "README.md").read_text()
    for set_name in sets:
        for row in ("baseline", "tuned", "exported @ scale 0.5"):
            for d in ("t2i", "i2t"):
                value = report["metrics"][set_name][row][d]["R@5"]["value"]
                assert m["evaluation"]["sets"][set_name][row][d]["R@5"] == pytest.approx(value)
        ci = report["metrics"][set_name]["tuned"]["t2i"]["R@1"]
        assert f"{ci['value']:.1f} [{ci['ci'][0]:.1f}, {ci['ci'][1]:.1f}]" in card
    assert m["evaluation"]["recommended_lora_scale"] == report["sweep"]["recommended_lora_scale"]
    for set_name, p in m["parity"].items():
        assert p["cosine"]["fp32"]["image"]["min"] >= 0.9999 and p["cosine"]["fp32"]["text"]["min"] >= 0.9999
        assert all(abs(v) <= 0.1 for d in p["torch_minus_fp32"].values() for v in d.values())
    cost = m["quantization"]["recall_cost"]["domain"]["t2i"]["R@5"]
    assert f"{cost['value']:+.1f} [{cost['ci'][0]:+.1f}, {cost['ci'][1]:+.1f}]" in card


def test_export_without_an_adapter_and_plain_lora_scale_refusal(tmp_path, tiny_vit_cfg):
    from mmft.model.factory import create_model

    model, _, preprocess, tok = create_model(tiny_vit_cfg)
    out = write_bundle(model, tok, preprocess, tmp_path / "plain")
    m = mmft.load_bundle(out).manifest
    assert m["adapter_sha256"] is None and m["fingerprint"]["adapter_sha256"] is None
    with pytest.raises(ValueError, match="needs a model with an adapter"):
        write_bundle(model, tok, preprocess, tmp_path / "scaled", lora_scale=0.5)


def test_quantize_needs_calibration_images_for_the_image_tower_only(vit, tmp_path):
    model, tok, preprocess, _ = vit
    with pytest.raises(ValueError, match="calibrat"):
        write_bundle(model, tok, preprocess, tmp_path / "q", quantize="int8")
    with pytest.raises(ValueError, match="int4"):
        write_bundle(model, tok, preprocess, tmp_path / "q", quantize="int4")
    assert not any(tmp_path.iterdir())
    out = write_bundle(model, tok, preprocess, tmp_path / "text-only", quantize="int8-text")
    b = mmft.load_bundle(out)
    assert b.precision == "int8" and b.manifest["encoders"]["files"]["int8"] == {
        "text": "text_encoder.int8.onnx", "image": "image_encoder.onnx"}
    assert b.manifest["quantization"]["image"] is None
    assert "image tower: kept fp32" in (out / "README.md").read_text()
    fp32 = mmft.load_bundle(out, precision="fp32")
    np.testing.assert_allclose(b.encode_image(_images()), fp32.encode_image(_images()), atol=1e-6)



def test_cli_exports_a_bundle_at_the_index_scale(deployed, tmp_path, capsys):
    from mmft.cli import main

    index = str(deployed["root"] / "index")
    out = tmp_path / "cli-bundle"
    args = ["export", "--format", "onnx", "--run", str(deployed["run"])]
    assert main(args + ["--out", str(out), "--index", index]) == 0
    m = mmft.load_bundle(out).manifest
    assert m["lora_scale"] == 0.5 and m["index"] == "index" and m["quantization"] is None
    assert main(args + ["--out", str(tmp_path / "bad"), "--index", index, "--lora-scale", "1.0"]) == 2
    assert "LoRA scale" in capsys.readouterr().err and not (tmp_path / "bad").exists()
