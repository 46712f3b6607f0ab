#!/usr/bin/env python
"""What attaching mined hard negatives (data.hard_negatives) costs the training data stream.

    python tools/bench_negatives.py                      # 1,000 generated 250 px JPEGs, model size 160, K=4
    python tools/bench_negatives.py --images 2000 --k 2,4 --workers 2

Measured in one run on the same generated shards (tools/bench_data.py's images and captions):
- the one-time index of the shards (tar headers -> key, offset, size) that lets a worker read a
  negative's image with one seek; per sample;
- the stream's samples/s and CPU ms per sample for two epochs: without negatives (the reference),
  with K negatives per sample and the per-worker decoded-image cache, and with K and no cache (every
  negative decoded again). The mined file is synthetic (8 random other pairs per pair): uniform picks
  are the cache's worst case; real mined negatives repeat (hubs), which the cache serves better.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import _cpu_seconds, load_tokenizer, make_images, write_shards


def synthetic_mined(path: Path, keys: list[str], k: int = 8, seed: int = 0) -> Path:
    from mmft.mining.format import write_mined

    rng = np.random.default_rng(seed)
    records = []
    for i, key in enumerate(keys):
        others = [keys[j] for j in rng.choice(np.delete(np.arange(len(keys)), i), size=k, replace=False)]
        records.append({"key": key, "group": None, "images": others, "image_scores": [0.0] * k,
                        "texts": [f"caption of {o}" for o in others], "text_keys": others,
                        "text_scores": [0.0] * k})
    return write_mined(path, {"k": k, "group_field": "", "model": None}, records)


def stream_rate(spec: str, workers: int, size: int, batch_size: int, tokenizer, mined: Path | None, k: int,
                cache: bool, epochs: int) -> tuple[float, float]:
    """(samples/s over `epochs` epochs, CPU ms per sample: workers + main process, start-up included)."""
    from mmft.config import DataConfig
    from mmft.data import negatives
    from mmft.data.stream import train_loader, train_transform

    negatives.CACHE_BYTES = (256 << 20) if cache else 0  # workers fork after this
    cfg = DataConfig(train=[spec], batch_size=batch_size, num_workers=workers, shuffle_buffer=1000,
                     hard_negatives=str(mined) if mined else "", negatives_per_sample=k)
    stream = train_loader(cfg, train_transform(size, (0.5,) * 3, (0.5,) * 3, cfg), tokenizer, seed=0)
    start, cpu, n = time.perf_counter(), _cpu_seconds(), 0
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for batch in stream:
            n += len(batch["key"])
            if mined:
                assert batch["extra_image"].shape[1] == k
    wall = time.perf_counter() - start
    return n / wall, (_cpu_seconds() - cpu) * 1e3 / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--side", type=int, default=250, help="side of the generated JPEGs (px)")
    p.add_argument("--image-size", type=int, default=160, help="model input size (px)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--k", default="4", help="comma-separated negatives per sample")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)
    from mmft.data.negatives import shard_offsets
    from mmft.data.stream import expand_specs

    tokenizer, tok_name = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_shards(make_images(args.images, args.side, "jpg"), "jpg", tmp)
        urls = expand_specs(spec)
        start = time.perf_counter()
        keys = sorted(shard_offsets(urls))
        scan_us = (time.perf_counter() - start) * 1e6 / len(keys)
        mined = synthetic_mined(Path(tmp) / "mined.jsonl", keys)
        rows = [("no negatives (reference)", 0, False, None)]
        for k in (int(v) for v in args.k.split(",")):
            rows += [(f"K={k}, cached decodes", k, True, mined), (f"K={k}, no cache", k, False, mined)]
        print(f"{len(keys)} samples ({args.side} px JPEG -> {args.image_size} px), batch {args.batch_size}, "
              f"{args.workers} workers, {args.epochs} epochs, {os.cpu_count()} CPUs, tokenizer {tok_name}")
        print(f"shard index (tar headers, once per training run): {scan_us:.1f} us per sample\n")
        print("| stream | samples/s | CPU ms / sample | time vs reference |")
        print("|---|---:|---:|---:|")
        ref = None
        for name, k, cache, m in rows:
            rate, cpu = stream_rate(spec, args.workers, args.image_size, args.batch_size, tokenizer, m,
                                    max(k, 1), cache, args.epochs)
            ref = ref or rate
            print(f"| {name} | {rate:.0f} | {cpu:.2f} | {ref / rate:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
