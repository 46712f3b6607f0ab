"""Data stage: WebDataset shards in, batches out; and the shard writer that makes such shards.

- stream: `train_loader` / `eval_loader`, the readers the trainer and the embedder use;
- stages: generator stages (decode, caption choice, skip counting) over sample iterators;
- tar_reader: tar member iteration (a fast header reader beside `tarfile`);
- epochs: shard specs, sizes and the per-epoch plan that deals shards to ranks and workers;
- augment: batched train-time augmentation;
- shard_writer: folders, tables and class folders -> img2dataset-layout shards (the writer).
"""
from mmft.data.stages import DataError, SkipStats
from mmft.data.stream import eval_loader, train_loader

__all__ = ["DataError", "SkipStats", "eval_loader", "train_loader"]
