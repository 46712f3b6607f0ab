"""One training batch through the model and into the loss: the plain step, and what both steps share.

The steps call the model through `PairEncoder`, so DDP wraps one forward that also encodes a batch's
mined hard negatives (batch["extra_image"] (B, K, 3, S, S), batch["extra_text"] (B, K, L)). The
negatives get encoder calls of their own rather than being concatenated to the batch: with BatchNorm
layers in train mode one joint forward would put the negatives into the batch statistics. Whenever
extras are passed the batch's group ids are passed too (the loss needs them to place the extras' group
ids), whatever train.use_groups says: without a group field every sample is its own group, so this
only keeps a negative that is in fact a sample's own pair out of its negatives.
"""
from __future__ import annotations

import torch
from torch import nn

EXTRA_INPUTS = {"extra_image": "extra_images", "extra_text": "extra_texts"}
EXTRA_GROUPS = {"extra_image_group": "extra_image_group_ids", "extra_text_group": "extra_text_group_ids"}


class PairEncoder(nn.Module):
    """model(images, texts) plus the features of the extra negatives, as one forward (for DDP)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, texts, extra_images=None, extra_texts=None) -> dict:
        out = dict(self.model(images, texts))
        if extra_images is not None:  # (B, K, 3, S, S)
            out["extra_image_features"] = self.model.encode_image(
                extra_images.flatten(0, 1), normalize=True)  # (B*K, D)
        if extra_texts is not None:  # (B, K, L)
            out["extra_text_features"] = self.model.encode_text(
                extra_texts.flatten(0, 1), normalize=True)  # (B*K, D)
        return out


def has_extras(batch: dict) -> bool:
    return any(k in batch for k in EXTRA_INPUTS)


def step_inputs(batch: dict, device: torch.device, use_groups: bool, normalize=None) -> tuple[dict, dict]:
    """(PairEncoder keyword inputs on `device`, the loss's group keyword arguments) of one batch.
    uint8 images (data.uint8_images) are converted and normalised on `device` by `normalize`."""
    inputs = {"images": batch["image"].to(device, non_blocking=True),  # (B, 3, S, S)
              "texts": batch["text"].to(device, non_blocking=True)}  # (B, L)
    groups = {}
    for key, name in EXTRA_INPUTS.items():
        if key in batch:
            inputs[name] = batch[key].to(device, non_blocking=True)  # (B, K, ...)
    for name in ("images", "extra_images"):
        if name in inputs and inputs[name].dtype == torch.uint8:
            if normalize is None:
                raise ValueError("the batch holds uint8 images but the trainer has no normalisation for "
                                 "them; set data.uint8_images=true so that it builds one")
            inputs[name] = normalize(inputs[name])  # (..., 3, S, S) float
    if has_extras(batch):
        if "group" not in batch:
            raise ValueError("a batch with extra negatives has no 'group' ids; the training stream adds "
                             "them with data.hard_negatives, a custom train_data must carry them too")
        for key, name in EXTRA_GROUPS.items():
            if key in batch:
                groups[name] = batch[key].flatten().to(device)  # (B*K,)
    if "group" in batch and (use_groups or groups):
        groups["group_ids"] = batch["group"].to(device)  # (B,)
    return inputs, groups


def device_normalize(data_cfg, preprocess_val, model):
    """With data.uint8_images: uint8 (..., 3, S, S) -> normalised float, for the trainer's device."""
    if not data_cfg.uint8_images:
        return None
    from mmft.data.augment import make_train_transform

    return make_train_transform(preprocess_val if preprocess_val is not None else model, data_cfg).normalize


def as_float(out: dict) -> dict:
    return {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}


def plain_backward(model, loss_fn, inputs: dict, groups: dict, autocast, scale_loss) -> torch.Tensor:
    """Forward the whole batch with autograd, take the loss, backpropagate scale_loss(loss); the loss."""
    with autocast():
        out = model(**inputs)
    loss = loss_fn(as_float(out), **groups)
    scale_loss(loss).backward()
    return loss
