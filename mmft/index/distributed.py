"""A gallery index built by several processes: each rank embeds its share of the shards into a part,
then one process trains the IVF quantiser once and merges the parts into one index.

    torchrun --nproc_per_node 4 -m mmft embed --run RUN --shards 'gallery-{00000..00099}.tar' --out parts
    mmft index merge parts --out index          (or build_index_distributed: both steps in one call)

Order: every image row is tagged with (shard number, position in the shard) and the merge puts the rows
back in that order, which is the order of one process reading the shards one after another. So the
merged index holds the same rows, ids and quantiser training sample as `build_index` over a
single-process embedding in shard order, whatever the world size and the number of loader workers.
A gallery whose vectors exceed the RAM budget is merged on disk: IVF sub-indexes over consecutive id
ranges are joined by faiss.contrib.ondisk.merge_ondisk into `index.ivfdata` beside `index.faiss`.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from mmft import distributed as dist_utils
from mmft.config import DataConfig, IndexConfig
from mmft.index.core import build_index, caption_ids, finish_index
from mmft.index.faiss_backend import (
    empty_faiss_index,
    extract_ivf,
    faiss_module,
    resolve_factory,
    training_rows,
    unit_rows,
)
from mmft.index.manifest import fingerprint_diffs
from mmft.io import atomic_path, write_json
from mmft.rundir import RunDir

PART_FILE, PARTS_FILE, ROWS_FILE, IVFDATA_FILE = "part.json", "parts.json", "rows.npy", "index.ivfdata"
PARTS_FORMAT = 1


def _split(shards: list[int], every: int, offset: int, n: int, i: int) -> tuple[list[int], int, int]:
    """Reader i of n: whole shards when there are enough of them, else every n-th of the kept samples."""
    if len(shards) >= n:
        return shards[i::n], every, offset
    return shards, every * n, offset + i * every


class _TaggedShards(IterableDataset):
    """Decoded samples of some shards in batches, each row tagged (shard number, position in the shard)."""

    def __init__(self, urls: list[str], plan: tuple[list[int], int, int], data_cfg, transform,
                 batch_size: int, workers: int):
        super().__init__()
        self.urls, self.plan, self.cfg, self.transform = urls, plan, data_cfg, transform
        self.batch_size, self.workers = batch_size, workers

    def _samples(self, shards: list[int], every: int, offset: int, stats):
        from mmft.data import stages as st
        from mmft.data.augment import draft_size

        cfg = self.cfg
        for i in shards:
            for pos, raw in enumerate(st.read_shard(self.urls[i], stats)):
                if pos % every != offset:
                    continue
                for s in st.decode_samples([raw], self.transform, stats, caption_key=cfg.caption_key,
                                           caption_field=cfg.caption_field, group_field=cfg.group_field,
                                           draft_size=draft_size(self.transform)):
                    yield i, pos, s

    def __iter__(self):
        from mmft.data.stages import SkipStats

        info = get_worker_info()
        plan = _split(*self.plan, self.workers, 0 if info is None else info.id)
        stats = SkipStats()
        samples = self._samples(*plan, stats)
        while chunk := list(itertools.islice(samples, self.batch_size)):
            yield {"image": default_collate([s["image"] for _, _, s in chunk]),  # (B, 3, S, S)
                   "key": [s["key"] for _, _, s in chunk], "captions": [s["captions"] for _, _, s in chunk],
                   "group": [s["group"] or s["key"] for _, _, s in chunk] if self.cfg.group_field else None,
                   "tag": torch.tensor([(i, pos) for i, pos, _ in chunk], dtype=torch.int64),  # (B, 2)
                   "skipped": stats.take_delta()}
        yield {"skipped": stats.take_delta()}


def _untag(loader, tags: list, stats):
    """Batches for mmft.embed.embed; their tags go to `tags` in the order embed sees them."""
    for item in loader:
        stats.merge(item.pop("skipped"))
        if "key" in item:
            tags.append(item.pop("tag").numpy())
            yield item


def embed_run(run_dir: str | Path, shards, out_dir: str | Path, *, lora_scale: float = 1.0,
              adapter: str = "best", data_cfg: DataConfig | None = None, modality: str = "both",
              batch_size: int = 128, fp16: bool = False, device: str = "auto") -> Path:
    """`mmft embed`: this rank embeds its share of `shards` with a run's model into out_dir/part-<rank>.

    Rank r of W takes shards r, r+W, ... (every W-th sample of each shard when there are fewer shards
    than ranks); rows.npy (N, 2) int64 records each image's (shard number, position in the shard).
    After a barrier, rank 0 writes out_dir/parts.json, the manifest of the whole set. Returns out_dir.
    """
    from mmft.data.stages import SkipStats
    from mmft.data.stream import expand_specs
    from mmft.embeddings import embed
    from mmft.model.adapter import load_model
    from mmft.model.lora import has_adapter
    from mmft.model.lora import lora_scale as scaled

    rank, world = dist_utils.rank_world()
    specs = [str(shards)] if isinstance(shards, (str, Path)) else [str(s) for s in shards]
    urls = expand_specs(specs)
    out_dir, data_cfg = Path(out_dir), data_cfg or DataConfig()
    part = out_dir / f"part-{rank:05d}"
    if rank == 0:
        (out_dir / PARTS_FILE).unlink(missing_ok=True)  # present only over a complete set of parts
    (part / PART_FILE).unlink(missing_ok=True)
    dev = dist_utils.device_for_rank(dist_utils.resolve_device(device))
    model, preprocess, tokenizer = load_model(run_dir, adapter=adapter, device=dev)
    workers = data_cfg.num_workers
    plan = _split(list(range(len(urls))), 1, 0, world, rank)
    dataset = _TaggedShards(urls, plan, data_cfg, preprocess, batch_size, max(1, workers))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=dev.type == "cuda")
    tags, stats = [], SkipStats(log=True)
    with scaled(model, lora_scale if has_adapter(model) else None):
        emb = embed(model, _untag(loader, tags, stats), tokenizer=tokenizer, batch_size=batch_size,
                    fp16=fp16, out_dir=part, modality=modality, device=dev, progress=rank == 0)
    with atomic_path(part / ROWS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, np.concatenate(tags) if tags else np.zeros((0, 2), np.int64))
    info = {"format": PARTS_FORMAT, "rank": rank, "world_size": world, "specs": specs, "shards": urls,
            "read": {"shards": plan[0], "every": plan[1], "offset": plan[2]}, "images": len(emb.keys),
            "captions": len(emb.captions), "skipped": stats.as_dict(),
            "run_dir": str(Path(run_dir).resolve()), "lora_scale": lora_scale, "modality": modality}
    write_json(part / PART_FILE, info)
    dist_utils.barrier()
    if rank == 0:
        write_json(out_dir / PARTS_FILE, {**{k: info[k] for k in ("format", "world_size", "specs", "shards",
                                                                  "run_dir", "lora_scale", "modality")},
                                          "parts": [f"part-{r:05d}" for r in range(world)]})
    return out_dir


# ---------------------------------------------------------------- reading parts back


def _part_dirs(parts) -> list[Path]:
    """Part directories from embed output folders (their parts.json) and/or part directories."""
    out: list[Path] = []
    for p in [parts] if isinstance(parts, (str, Path)) else parts:
        p = Path(p)
        if (p / PARTS_FILE).is_file():
            out += [p / name for name in json.loads((p / PARTS_FILE).read_text())["parts"]]
        elif (p / PART_FILE).is_file():
            out.append(p)
        elif p.is_dir() and any(p.glob(f"part-*/{PART_FILE}")):
            raise ValueError(f"{p} holds parts but no {PARTS_FILE} (an embed run that did not finish?); "
                             "run `mmft embed` again, or pass the part directories themselves")
        else:
            raise ValueError(f"{p} is neither an `mmft embed` output folder nor a part directory "
                             f"({PARTS_FILE} / {PART_FILE} missing)")
    return out


class _Parts:
    """All parts of one embed run, checked for completeness, with rows mapped to the canonical order."""

    def __init__(self, parts):
        from mmft.embeddings import Embeddings

        dirs = _part_dirs(parts)
        self.info = [json.loads((d / PART_FILE).read_text()) for d in dirs]
        self._check(dirs)
        self.dirs = [dirs[i] for i in np.argsort([x["rank"] for x in self.info])]
        self.info.sort(key=lambda x: x["rank"])
        self.emb = [Embeddings.load(d) for d in self.dirs]  # memory-mapped
        tags = np.concatenate([np.load(d / ROWS_FILE) for d in self.dirs])  # (N, 2)
        self.image_order = np.lexsort((tags[:, 1], tags[:, 0]))  # canonical row -> concatenated row
        sizes = [len(e.keys) for e in self.emb]
        self.image_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if len(tags) != self.image_offsets[-1] or len(np.unique(tags, axis=0)) != len(tags):
            raise ValueError(f"the parts in {self.dirs[0].parent} overlap or do not match their {ROWS_FILE}; "
                             "embed the gallery again into an empty folder")
        full = [e for e in self.emb if len(e.keys)]
        self.meta = full[0].meta if full else {}
        for d, e in zip(self.dirs, self.emb):
            if len(e.keys) and fingerprint_diffs(e.meta, self.meta):
                raise ValueError(f"part {d} was embedded with another model, adapter or LoRA scale than "
                                 f"{self.dirs[0]}; embed all parts with one run and one --lora-scale")

    def _check(self, dirs: list[Path]) -> None:
        first = self.info[0]
        for d, x in zip(dirs, self.info):
            if x["shards"] != first["shards"] or x["world_size"] != first["world_size"]:
                raise ValueError(f"part {d} comes from another embed run than {dirs[0]} (other shards or "
                                 "world size); merge the parts of one run only")
        ranks = sorted(x["rank"] for x in self.info)
        if ranks != list(range(first["world_size"])):
            missing = sorted(set(range(first["world_size"])) - set(ranks))
            raise ValueError(f"the parts cover ranks {ranks} of a {first['world_size']}-process embed run "
                             f"(missing {missing}, or given twice); pass every part directory once")

    def vectors(self, modality: str) -> _Rows:
        """Gallery rows of `modality` in canonical order, with their ids (as mmft.index.core names them)."""
        if modality not in ("image", "text"):
            raise ValueError(f"modality={modality!r}: a gallery index is over 'image' or 'text' vectors")
        arrays = [e.image if modality == "image" else e.text for e in self.emb]
        rows = [len(e.keys) if modality == "image" else len(e.captions) for e in self.emb]
        if any(len(a) != n or (n and a.shape[1] == 0) for a, n in zip(arrays, rows)):
            raise ValueError(f"the parts in {self.dirs[0].parent} hold no {modality} vectors; embed the "
                             f"gallery with modality 'both' or '{modality}'")
        keys = [k for e in self.emb for k in e.keys]
        image_ids = [keys[i] for i in self.image_order]  # canonical order
        if modality == "image":
            return _Rows(arrays, self.image_order, image_ids)
        rank_of = np.empty_like(self.image_order)
        rank_of[self.image_order] = np.arange(len(rank_of))
        owner = rank_of[np.concatenate([o + np.asarray(e.caption_image, np.int64)
                                        for o, e in zip(self.image_offsets, self.emb)])]  # (M,)
        order = np.argsort(owner, kind="stable")  # captions of one image keep their order
        return _Rows(arrays, order, caption_ids(image_ids, owner[order]))


class _Rows:
    """Vectors spread over parts (memory maps), read in canonical order without joining them first."""

    def __init__(self, arrays: list[np.ndarray], order: np.ndarray, ids: list[str]):
        self.arrays, self.order, self.ids = arrays, order, ids
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)
        self.dim = max((a.shape[1] for a in arrays if len(a)), default=0)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, rows) -> np.ndarray:
        """Rows by slice or index array, as from an (N, D) array (what the tuner's exact search reads)."""
        return self.take(np.arange(len(self))[rows])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32 of canonical rows `rows`."""
        src = self.order[rows]
        part = np.searchsorted(self.offsets, src, side="right") - 1
        out = np.empty((len(rows), self.dim), np.float32)  # (n, D)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.arrays[p][src[sel] - self.offsets[p]]
        return out


# ---------------------------------------------------------------- merging


def ram_budget() -> int:
    """Bytes of vectors merged in memory by default: a quarter of the machine's RAM."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def merge_index_parts(parts, out_dir: str | Path, index_cfg: IndexConfig | None = None, *,
                      modality: str = "image", ondisk: bool | None = None, budget: int | None = None,
                      seed: int = 0, progress: bool = False):
    """`mmft index merge`: one index (mmft.index.core layout, one manifest) over all parts of an embed run.

    parts: embed output folders and/or part directories. The quantiser trains once, on the seeded
    sample `build_index` would draw from the rows in shard order. ondisk: None = on disk when the
    float32 vectors exceed `budget` bytes (default: a quarter of RAM); on-disk merging needs an IVF
    factory. Returns the mmft.index.core.Index, saved in out_dir.
    """
    cfg = index_cfg or IndexConfig()
    group = _Parts(parts)
    rows = group.vectors(modality)
    n, dim = len(rows), rows.dim
    if n == 0:
        raise ValueError(f"the parts in {group.dirs[0].parent} hold no {modality} vectors "
                         "(an empty gallery?)")
    factory = resolve_factory(cfg.factory, n, cfg.fp16)
    first = group.info[0]
    extra = {"source": {"shards": first["specs"], "run_dir": first["run_dir"]},
             "merged_from": {"parts": len(group.dirs), "world_size": first["world_size"]}}
    budget = ram_budget() if budget is None else budget
    if ondisk is None:
        ondisk = 2 * n * dim * 4 > budget  # the joined vectors plus the index itself
    # a tuned index holds out queries of the other modality, as a single-process build does
    pool = _other_rows(group, modality) if cfg.target_recall else None
    if ondisk:
        return _merge_ondisk(rows, Path(out_dir), cfg, factory, group.meta, modality, seed, extra, budget,
                             pool)
    from mmft.embeddings import Embeddings

    vectors = np.empty((n, dim), np.float32)  # (N, D)
    for s in range(0, n, 65_536):
        vectors[s:s + 65_536] = rows.take(np.arange(s, min(n, s + 65_536)))
    empty = np.zeros((0, dim), np.float32)
    emb = Embeddings(image=vectors if modality == "image" else empty,
                     text=vectors if modality == "text" else empty, keys=[], captions=[],
                     caption_image=np.zeros(0, np.int64), meta=group.meta)
    if not cfg.target_recall:  # (a tuned build chooses the factory itself)
        cfg = dataclasses.replace(cfg, factory=factory, fp16=False)  # the factory already says fp16
    return build_index(emb, out_dir, ids=rows.ids, index_cfg=cfg, modality=modality, seed=seed,
                       progress=progress, extra=extra, queries=pool)


def _other_rows(group: _Parts, modality: str) -> _Rows | None:
    """Caption rows of an image gallery (image rows of a caption gallery) when the parts hold them."""
    try:
        other = group.vectors("text" if modality == "image" else "image")
    except ValueError:
        return None
    return other if len(other) else None


def _merge_ondisk(rows: _Rows, out_dir: Path, cfg: IndexConfig, factory: str, meta: dict, modality: str,
                  seed: int, extra: dict, budget: int, pool: _Rows | None = None):
    """Train once, fill sub-indexes over consecutive id ranges, merge their lists into index.ivfdata."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = faiss_module()
    start, n, dim = time.time(), len(rows), rows.dim
    index = empty_faiss_index(dim, factory)
    if extract_ivf(index) is None:
        raise ValueError(f"on-disk merging needs an inverted-file factory such as 'IVF1024,Flat', not "
                         f"'{factory}'; set index.factory, or merge in memory (ondisk=False)")
    # the seeded sample new_faiss_index draws, here over the rows in shard order
    index.train(unit_rows(rows.take(training_rows(n, index, cfg.train_sample, seed))))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "merge-parts"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    step = max(65_536, budget // (8 * dim))
    names = []
    for s in range(0, n, step):  # consecutive ranges: each inverted list ends up in id order
        sub = faiss.clone_index(index)
        for c in range(s, min(n, s + step), 65_536):
            ids = np.arange(c, min(n, s + step, c + 65_536))
            sub.add_with_ids(unit_rows(rows.take(ids)), ids)
        names.append(str(tmp / f"sub-{len(names):05d}.index"))
        faiss.write_index(sub, names[-1])
        del sub
    (out_dir / IVFDATA_FILE).unlink(missing_ok=True)
    merge_ondisk(index, names, str((out_dir / IVFDATA_FILE).resolve()))
    shutil.rmtree(tmp, ignore_errors=True)
    extra = {**extra, "ondisk": {"file": IVFDATA_FILE, "bytes": (out_dir / IVFDATA_FILE).stat().st_size}}
    nprobe, held = cfg.nprobe, None
    if cfg.target_recall:  # the factory is fixed on disk: tune its nprobe on held-out queries
        from mmft.index.heldout import held_out_sample
        from mmft.index.tuning import tune_search

        kind = "captions" if modality == "image" else "images"
        held = held_out_sample(rows, pool, size=cfg.heldout, seed=seed, source=kind)
        extra["tuning"] = tune_search(index, factory, held, cfg.target_recall,
                                      max_latency_ms=cfg.max_latency_ms or None)
        nprobe = extra["tuning"]["chosen"]["nprobe"]
    return finish_index(index, rows.ids, factory=factory, fingerprint=meta, modality=modality, start=start,
                        nprobe=nprobe, extra=extra, out_dir=out_dir, heldout=held)


def build_index_distributed(run_dir: str | Path, shards, out_dir: str | Path | None = None,
                            index_cfg: IndexConfig | None = None, *, data_cfg: DataConfig | None = None,
                            modality: str = "image", batch_size: int = 128, keep_embeddings: bool = False):
    """`mmft index build` under torchrun: every rank embeds its share, rank 0 merges; returns out_dir.

    The same index as mmft.index.core.build_index_from_run (out_dir defaults to run_dir/index).
    """
    cfg = index_cfg or IndexConfig()
    out = Path(out_dir) if out_dir is not None else RunDir(run_dir).index_dir
    parts = out / "embeddings"
    embed_run(run_dir, shards, parts, lora_scale=cfg.lora_scale, data_cfg=data_cfg, batch_size=batch_size,
              fp16=cfg.fp16, modality="both" if cfg.target_recall else modality)  # tuning holds out captions
    if dist_utils.rank_world()[0] == 0:
        merge_index_parts(parts, out, cfg, modality=modality)
        if not keep_embeddings:
            shutil.rmtree(parts, ignore_errors=True)
    dist_utils.barrier()
    return out
