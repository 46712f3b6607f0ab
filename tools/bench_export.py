#!/usr/bin/env python
"""Benchmark a deployment bundle: ONNX Runtime (fp32, int8) against torch eager, parity and recall on test
shards, and FAISS codecs (fp16, SQ8, PQ) for the index, all in one run.

    python tools/bench_export.py --run runs/demo/domain-lora \
        --domain 'data/demo/openclipart/domain/test-*.tar' \
        --general 'data/demo/openclipart/general/test-*.tar'
    python tools/bench_export.py                      # mmft-mini + a random adapter, synthetic shards

Speed: text batches of 1 and 64 captions, image batches of 1 and 32, each implementation called in turn
(interleaved rounds, so a busy machine slows all of them alike) on pre-tokenized / pre-processed inputs:
the encoders alone. Latency = median wall time per call; throughput = batch / that latency; the CPU-time
column divides process CPU time by the thread count (= wall time on an idle machine). Torch runs eager
in inference mode twice: with the LoRA layers as trained (how `mmft serve` runs it) and with the adapter
merged into the weights (the same graph ONNX gets).
Parity: every image and caption of the shards through torch and through the bundle (its tokenizer.json
and numpy transform), row cosines; recall of int8 minus fp32 with paired bootstrap CIs.
Index: the bundle's gallery vectors and a clustered synthetic gallery (Gaussian blobs around random
centres on the sphere), each factory's serialized size, queries/s and recall@10 against exact search.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CAPTIONS = ["a red apple", "two dogs playing in the snow", "a cartoon cat with a hat", "green leaves",
            "a slice of pizza with olives and cheese", "a bicycle", "an old map of the world",
            "a smiling sun"]


def synthetic_shards(root: Path, n: int = 96) -> list[str]:
    """n captioned drawings (coloured shapes on grey) written as shards, when no real shards are given."""
    from PIL import Image, ImageDraw

    from mmft.data.shard_writer import make_shards

    rng = np.random.default_rng(0)
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
    for i in range(n):
        name, shape = list(colours)[i % 4], ("square", "circle")[(i // 4) % 2]
        img = Image.new("RGB", (200, 160), tuple(int(v) for v in rng.integers(90, 170, 3)))
        x, y = (int(v) for v in rng.integers(10, 80, 2))
        draw = ImageDraw.Draw(img)
        (draw.rectangle if shape == "square" else draw.ellipse)([x, y, x + 70, y + 70], fill=colours[name])
        img.save(src / f"s{i:04d}.png")
        (src / f"s{i:04d}.txt").write_text(f"a {name} {shape}\n")
    make_shards(src, root / "shards", samples_per_shard=48, progress=False)
    return [str(p) for p in sorted((root / "shards").glob("*.tar"))]


def load_model(args):
    """(model, tokenizer, preprocess, LoRA scale, run dir or None)."""
    import torch

    from mmft.model.adapter import load_model as load_run

    if args.run:
        m = load_run(args.run)
        return m.model, m.tokenizer, m.preprocess, args.lora_scale, args.run
    from mmft.config import LoraConfig, ModelConfig
    from mmft.model.factory import create_model
    from mmft.model.lora import apply_lora

    model, _, preprocess, tok = create_model(ModelConfig(name="mmft-mini"))
    apply_lora(model, LoraConfig())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval(), tok, preprocess, args.lora_scale, None


# ---------------------------------------------------------------- speed


def _clock(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def speed(impls: dict, inputs: dict, threads: int, seconds: float, rounds: int = 3) -> list[dict]:
    """Timing of every implementation on every (tower, batch) input, in rounds of one block each.

    Blocks, not single calls, alternate: both runtimes keep their worker threads spinning for a while after
    a call, and a call of the other runtime inside that window would be slowed by it.
    """
    rows = []
    for (tower, batch), feeds in inputs.items():
        calls = {name: (lambda f=fns[tower], x=feeds[name if name in feeds else "torch"]: f(x))
                 for name, fns in impls.items()}
        times = {name: [] for name in calls}
        for _ in range(rounds):
            for name, fn in calls.items():
                fn()  # warm-up, and the other runtime's threads go idle
                start = time.perf_counter()
                while time.perf_counter() - start < seconds / rounds or len(times[name]) < 2:
                    times[name].append(_clock(fn))
        for name, t in times.items():
            wall = float(np.median([w for w, _ in t]))
            cpu = float(np.median([c for _, c in t])) / threads
            rows.append({"tower": tower, "batch": batch, "impl": name, "latency_ms": 1000 * wall,
                         "items_per_s": batch / wall, "items_per_s_cpu": batch / max(cpu, 1e-9),
                         "calls": len(t)})
    return rows


def speed_setup(model, tok, preprocess, scale, bundle_dir: Path, threads: int, images: list):
    """({impl: {"text": fn(ids), "image": fn(pixels)}}, {(tower, batch): {impl or "torch": input}})."""
    import torch

    import mmft
    from mmft.bundle.onnx_export import merged_copy
    from mmft.model.lora import lora_scale

    torch.set_num_threads(threads)
    merged = merged_copy(model, scale)
    with lora_scale(model, scale):
        lora = __import__("copy").deepcopy(model).eval()  # LoRA layers at the scale, unmerged

    def torch_fns(m):
        def text(ids):
            with torch.inference_mode():
                return m.encode_text(ids, normalize=True)

        def image(px):
            with torch.inference_mode():
                return m.encode_image(px, normalize=True)
        return {"text": text, "image": image}

    impls = {"torch eager, LoRA layers": torch_fns(lora), "torch eager, merged": torch_fns(merged)}
    bundles = {p: mmft.load_bundle(bundle_dir, precision=p, threads=threads) for p in ("fp32", "int8")}
    for p, b in bundles.items():
        impls[f"onnxruntime {p}"] = {"text": b.embed_tokens, "image": b.embed_pixels}
    caps = (CAPTIONS * 8)[:64]
    px = torch.stack([preprocess(images[i % len(images)]) for i in range(32)])  # (32, 3, H, W)
    inputs = {}
    for tower, batch in (("text", 1), ("text", 64), ("image", 1), ("image", 32)):
        if tower == "text":
            feeds = {"torch": tok(caps[:batch])}
            feeds.update({f"onnxruntime {p}": b.tokenizer(caps[:batch]) for p, b in bundles.items()})
        else:
            feeds = {"torch": px[:batch]}
            feeds.update({f"onnxruntime {p}": px[:batch].numpy() for p in bundles})
        inputs[(tower, batch)] = feeds
    return impls, inputs


# ---------------------------------------------------------------- index codecs


def clustered(n: int, nq: int, dim: int, centres: int = 2000, sigma: float = 1.0, seed: int = 0):
    """(gallery (n, dim), queries (nq, dim)) unit rows: Gaussian blobs of noise norm ~sigma around centres."""
    rng = np.random.default_rng(seed)
    cen = rng.standard_normal((centres, dim)).astype(np.float32)
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 100_000):
            b = min(100_000, m - s)
            x = cen[rng.integers(0, centres, b)] + rng.standard_normal((b, dim)).astype(np.float32) * (
                sigma / np.sqrt(dim))
            out[s:s + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(nq)


def timed(fn, threads: int, repeat: int = 1):
    """(result, best wall s, best CPU s / threads) over `repeat` runs."""
    best_w = best_c = float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        best_w = min(best_w, time.perf_counter() - w)
        best_c = min(best_c, (time.process_time() - c) / threads)
    return out, best_w, best_c


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found[:, :10], exact[:, :10])]))


def codec_rows(name: str, gallery: np.ndarray, queries: np.ndarray, threads: int,
               train_sample: int) -> list[dict]:
    """Size, build time, queries/s (CPU) and recall@10 of FAISS factories over one gallery."""
    import faiss

    from mmft.index.core import default_nlist, default_nprobe, new_faiss_index, set_search_params

    n, d = gallery.shape
    factories = ["Flat", "SQfp16", "SQ8"] + ([f"PQ{d // 4}", f"PQ{d // 8}"] if n >= 10_000 else [])
    if n >= 50_000:
        nlist = default_nlist(n)
        factories += [f"IVF{nlist},SQfp16", f"IVF{nlist},SQ8", f"IVF{nlist},PQ{d // 4}"]
    k = min(10, n)
    rows, exact = [], None
    for f in factories:
        index, build_s, _ = timed(lambda f=f: new_faiss_index(gallery, f, train_sample=train_sample), threads)
        ivf = "IVF" in f
        if ivf:
            set_search_params(index, nprobe=default_nprobe(default_nlist(n)))
        (_, found), _, cpu = timed(lambda ix=index: ix.search(queries, k), threads, repeat=3)
        exact = found if f == "Flat" else exact
        size = len(faiss.serialize_index(index))
        rows.append({"gallery": name, "n": n, "factory": f + (f" nprobe={default_nprobe(default_nlist(n))}"
                                                              if ivf else ""),
                     "bytes": size, "bytes_per_vector": size / n, "build_s": build_s,
                     "qps_cpu": len(queries) / max(cpu, 1e-9), "recall_at_10": recall_at_10(found, exact)
                     if k == 10 else float("nan")})
    return rows


# ---------------------------------------------------------------- serving start-up, two installs

STARTUP = r"""
import json, sys, time
t0 = time.perf_counter()
import asyncio, httpx
from mmft.serve import create_app
app = create_app(json.loads(sys.argv[1]))

async def run():
    async with app.router.lifespan_context(app):
        ready = time.perf_counter()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as c:
            r = await c.post("/search/text", json={"tenant": "tuned", "text": "a red apple", "k": 5})
        return ready, r.status_code

ready, status = asyncio.run(run())
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))  # kB
print(json.dumps({"import_and_load_s": ready - t0, "first_answer_s": time.perf_counter() - t0,
                  "status": status, "torch_imported": "torch" in sys.modules, "peak_rss_mb": hwm / 1024}))
"""


def _site_packages_mb(python: str) -> float:
    import subprocess

    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    total = sum(f.stat().st_size for f in Path(site).rglob("*") if f.is_file() and not f.is_symlink())
    return total / 1e6


def startup(pythons: dict[str, str], configs: dict[str, dict], repeat: int = 2) -> list[dict]:
    """Install size and start-up of the service per install: process start to the first answer."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}  # mmft from this checkout, everything else from the venv
    rows = []
    for name, python in pythons.items():
        best = None
        for _ in range(repeat):
            t = time.perf_counter()
            proc = subprocess.run([python, "-c", STARTUP, json.dumps(configs[name])], capture_output=True,
                                  text=True, env=env, cwd=root, check=False)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"{name} service did not start: {proc.stderr[-2000:]}")
            r = {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": wall}
            best = r if best is None or r["process_wall_s"] < best["process_wall_s"] else best
        rows.append({"install": name, "python": python, "site_packages_mb": _site_packages_mb(python),
                     **best})
    return rows


def _startup_table(rows: list[dict]) -> str:
    out = [("| install | site-packages MB | torch imported | process start -> first answer s | "
            "imports + model load s | peak RSS MB |"), "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['install']} | {r['site_packages_mb']:,.0f} | {r['torch_imported']} | "
                   f"{r['process_wall_s']:.1f} | {r['import_and_load_s']:.1f} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(out)


def startup_section(args, run: str | None, bundle_dir: Path, sets: dict, tmp: Path) -> list[dict]:
    """Both backends serving one tenant ("tuned") with the same gallery index."""
    from mmft.config import DataConfig, IndexConfig
    from mmft.index.core import build_index_from_run

    if not run:
        raise SystemExit("--python-torch/--python-onnx need --run (the torch service loads a run directory)")
    index = tmp / "startup-index"
    cfg = IndexConfig(factory="Flat", lora_scale=args.lora_scale)
    build_index_from_run(run, next(iter(sets.values())), index, cfg, data_cfg=DataConfig(num_workers=0),
                         progress=False)
    common = {"baseline": {"enabled": False}, "feedback": {"path": ""}}
    tenant = {"lora_scale": args.lora_scale, "index": str(index)}
    # the encoder in the service's own process, so that its imports and memory are the ones measured
    configs = {"torch": {"base": {"run": run, "threads": args.threads, "process": False},
                         "tenants": {"tuned": {"run": run, **tenant}}, **common},
               "onnx (serve-onnx)": {"base": {"backend": "onnx", "threads": args.threads, "process": False},
                                     "tenants": {"tuned": {"adapter": str(bundle_dir), **tenant}}, **common}}
    return startup({"torch": args.python_torch, "onnx (serve-onnx)": args.python_onnx}, configs)


# ---------------------------------------------------------------- tables


def _speed_table(rows: list[dict]) -> str:
    out = [("| tower | batch | implementation | latency ms (median) | items/s | items/s (CPU time) | "
            "vs torch eager merged (wall / CPU) |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next(x for x in rows if x["tower"] == r["tower"] and x["batch"] == r["batch"]
                   and x["impl"] == "torch eager, merged")
        out.append(f"| {r['tower']} | {r['batch']} | {r['impl']} | {r['latency_ms']:.2f} | "
                   f"{r['items_per_s']:,.1f} | {r['items_per_s_cpu']:,.1f} | "
                   f"{r['items_per_s'] / ref['items_per_s']:.2f}x / "
                   f"{r['items_per_s_cpu'] / ref['items_per_s_cpu']:.2f}x |")
    return "\n".join(out)


def text_only_int8(int8, threads: int):
    """The bundle with its int8 text tower and fp32 image tower (what --quantize int8-text writes)."""
    import copy

    from mmft.bundle.runtime import Bundle

    manifest = copy.deepcopy(int8.manifest)
    files = manifest["encoders"]["files"]
    files["int8-text"] = {"text": files["int8"]["text"], "image": files["fp32"]["image"]}
    return Bundle(int8.path, manifest, "int8-text", threads)


def _parity_table(parity: dict, cost: dict | None) -> str:
    out = ["| set | precision | tower | rows | min cosine | mean cosine |", "|---|---|---|---|---|---|"]
    for s, p in parity.items():
        for prec, towers in p["cosine"].items():
            for tower, c in towers.items():
                out.append(f"| {s} | {prec} | {tower} | {c['rows']} | {c['min']:.6f} | {c['mean']:.6f} |")
    out += ["", ("| set | direction | torch − fp32 R@1 / R@5 | precision | fp32 R@5 | its R@5 | "
                 "it − fp32 R@1 [95% CI] | it − fp32 R@5 [95% CI] |"), "|---|---|---|---|---|---|---|---|"]
    for s, p in parity.items():
        for d in ("t2i", "i2t"):
            t = p["torch_minus_fp32"][d]
            for prec, by_dir in (cost or {}).get(s, {}).items():
                c = by_dir[d]
                ci = [f"{c[m]['value']:+.1f} [{c[m]['ci'][0]:+.1f}, {c[m]['ci'][1]:+.1f}]"
                      for m in ("R@1", "R@5")]
                out.append(f"| {s} | {d} | {t['R@1']:+.2f} / {t['R@5']:+.2f} | {prec} | "
                           f"{c['fp32_R@5']:.1f} | {c['int8_R@5']:.1f} | {ci[0]} | {ci[1]} |")
    return "\n".join(out)


def _codec_table(rows: list[dict]) -> str:
    out = ["| gallery | N | factory | bytes/vector | index MB | build s | queries/s (CPU) | recall@10 |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['gallery']} | {r['n']:,} | {r['factory']} | {r['bytes_per_vector']:.1f} | "
                   f"{r['bytes'] / 1e6:.1f} | {r['build_s']:.2f} | {r['qps_cpu']:,.0f} | "
                   f"{100 * r['recall_at_10']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="training run directory (default: mmft-mini with a random adapter)")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--domain", nargs="+", help="DOMAIN test shard specs (parity, recall, calibration)")
    p.add_argument("--general", nargs="+", help="GENERAL test shard specs")
    p.add_argument("--bundle", help="where to write the bundle (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0, help="timing per implementation and input")
    p.add_argument("--index-sizes", type=int, nargs="*", default=[100_000], help="synthetic gallery sizes")
    p.add_argument("--dim", type=int, default=256, help="synthetic gallery dimension")
    p.add_argument("--skip", nargs="*", default=[], choices=["speed", "parity", "index"])
    p.add_argument("--python-torch", help="python of an install with torch + the serve extra (start-up row)")
    p.add_argument("--python-onnx", help="python of an install with only the serve-onnx extra (start-up row)")
    p.add_argument("--json", help="write every measurement to this JSON file")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from mmft.bundle.writer import gallery_images, write_bundle
    from mmft.config import DataConfig, EvalConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    sets = {k: v for k, v in (("domain", args.domain), ("general", args.general)) if v}
    if not sets:
        sets = {"synthetic": synthetic_shards(tmp)}
        print(f"# no shards given: {len(sets['synthetic'])} synthetic shards of drawn shapes in {tmp}")
    calib = next(iter(sets.values()))
    model, tok, preprocess, scale, run = load_model(args)
    t = time.perf_counter()
    out = write_bundle(model, tok, preprocess, args.bundle or tmp / "bundle", lora_scale=scale,
                       quantize="int8", calibration_specs=calib, run_dir=run, progress=False)
    export_s = time.perf_counter() - t
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, {args.threads} "
          f"threads, load average {os.getloadavg()[0]:.1f}; bundle {out} written in {export_s:.1f} s")
    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform()},
              "export_s": export_s, "bundle": str(out)}
    images = gallery_images(calib, 32)
    if "speed" not in args.skip:
        impls, inputs = speed_setup(model, tok, preprocess, scale, out, args.threads, images)
        report["speed"] = speed(impls, inputs, args.threads, args.seconds)
        print("\n## Speed\n\n" + _speed_table(report["speed"]), flush=True)
    if "parity" not in args.skip:
        from mmft.bundle.measure import onnx_comparison
        from mmft.bundle.runtime import load_bundle

        bundles = {p_: load_bundle(out, precision=p_, threads=args.threads) for p_ in ("fp32", "int8")}
        bundles["int8-text"] = text_only_int8(bundles["int8"], args.threads)
        data_cfg = DataConfig(num_workers=0)
        parity, cost = onnx_comparison(model, scale, bundles, sets, EvalConfig(), data_cfg, tok, preprocess,
                                       False)
        report["parity"], report["recall_cost"] = parity, cost
        print("\n## Parity and int8 recall\n\n" + _parity_table(parity, cost), flush=True)
    if "index" not in args.skip:
        report["index"] = index_section(args, out, sets)
        print("\n## Index codecs\n\n" + _codec_table(report["index"]), flush=True)
    if args.python_torch and args.python_onnx:
        report["startup"] = startup_section(args, run, out, sets, tmp)
        print("\n## Serving start-up\n\n" + _startup_table(report["startup"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def index_section(args, bundle_dir: Path, sets: dict) -> list[dict]:
    """Codec rows over the bundle's image vectors of the shards (queries: their captions), then synthetic."""

    import mmft
    from mmft.bundle.measure import _OnnxModel, _Preprocess, _Tokenizer
    from mmft.config import DataConfig
    from mmft.embeddings import embed

    b = mmft.load_bundle(bundle_dir, precision="fp32", threads=args.threads)
    embs = [embed(_OnnxModel(b), s, tokenizer=_Tokenizer(b), preprocess=_Preprocess(b),
                  data_cfg=DataConfig(num_workers=0), progress=False) for s in sets.values()]
    gallery = np.concatenate([e.image for e in embs]).astype(np.float32)
    queries = np.concatenate([e.text for e in embs]).astype(np.float32)
    rows = codec_rows("+".join(sets) + " (bundle fp32)", gallery, queries, args.threads, 100_000)
    for n in args.index_sizes:
        x, q = clustered(n, 2000, args.dim)
        rows += codec_rows("clustered σ=1", x, q, args.threads, 100_000)
        print(f"# index codecs on {n:,} synthetic vectors done", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
