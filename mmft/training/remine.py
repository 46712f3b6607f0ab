"""Re-mining hard negatives during training (data.remine_every = N epochs).

Negatives mined with the base model go stale as the towers move: what the tuned model already tells
apart stops teaching it anything. Before every N-th epoch rank 0 mines the training set again with the
model being trained (mmft.mining.core.mine_with_model, the k, threshold and direction of the original
file) into the run directory (RunDir.mined(epoch)); after a barrier every rank's stream reloads it, and
from that epoch on the batches carry the new negatives. The epoch alone decides which file applies, and
an existing file is reused, so a resumed run reads the negatives the killed run trained with.
"""
from __future__ import annotations

import logging

from mmft import distributed as dist_utils
from mmft.model.lora import train_mode

log = logging.getLogger("mmft.training.remine")


def remine_epoch(every: int, epoch: int) -> int:
    """The epoch whose re-mined negatives `epoch` trains with; 0 = the configured file."""
    return (epoch // every) * every if every > 0 else 0


def _eval_preprocess(model, preprocess):
    """The eval image transform (the one the trainer was given, else the model's own open_clip one)."""
    if preprocess is not None:
        return preprocess
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = getattr(model.visual, "preprocess_cfg", None)
    if cfg is None:
        raise ValueError("data.remine_every needs the model's eval preprocess: let train() create the "
                         "model (model=None) or use a model whose visual tower has preprocess_cfg")
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def mine_again(model, preprocess, tokenizer, data_cfg, out, epoch: int):
    """Mine data_cfg.train with `model` into `out`, with the settings of data_cfg.hard_negatives."""
    from mmft.mining.core import mine_with_model
    from mmft.mining.format import read_mined

    header = read_mined(data_cfg.hard_negatives).header
    k = max(int(header.get("k", data_cfg.negatives_per_sample)), data_cfg.negatives_per_sample)
    path = mine_with_model(model, _eval_preprocess(model, preprocess), tokenizer, data_cfg.train, out, k=k,
                           data_cfg=data_cfg, threshold=float(header.get("threshold", 0.95)),
                           by=header.get("by", "same"), progress=False,
                           source={"remined_before_epoch": epoch})
    train_mode(model)  # embedding left the model in eval mode
    return path


def maybe_remine(s, epoch: int) -> None:
    """Before `epoch` of the trainer's Setup `s`: mine again when due, and make the stream use the
    negatives that belong to this epoch (also right after a resume)."""
    data_cfg = s.cfg.data
    target = remine_epoch(data_cfg.remine_every, epoch)
    if target == 0 or s.mined_epoch == target:
        return
    if not data_cfg.hard_negatives or not hasattr(s.train_data, "reload_negatives"):
        raise ValueError("data.remine_every needs data.hard_negatives (the first mined file) and the "
                         "training stream of data.train")
    path = s.run.mined(target)
    if s.is_main and not path.is_file():
        log.info("re-mining hard negatives with the current model before epoch %d", target)
        path.parent.mkdir(parents=True, exist_ok=True)
        mine_again(s.model, s.preprocess_val, s.tokenizer, data_cfg, path, target)
    dist_utils.barrier()
    s.train_data.reload_negatives(path)
    s.mined_epoch = target
