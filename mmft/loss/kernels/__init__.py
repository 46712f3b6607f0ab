"""Fast paths for mmft's contrastive losses; mmft.loss.contrastive dispatches to them and holds the reference.

- chunked: PyTorch autograd.Function over logit tiles (CPU and CUDA, any float dtype).
- infonce_triton, sigmoid_triton: fused Triton kernels for CUDA (imported only when used, so that
  importing mmft never imports triton); _triton_common holds their shared pieces and tuning configs.
"""
from __future__ import annotations

from typing import NamedTuple


class Extras(NamedTuple):
    """Extra negatives of one loss term: extra rows ax (Mi, D) and extra columns bx (Mt, D), which are
    only ever negatives, and their group ids gax (Mi,), gbx (Mt,) (None: never excluded)."""

    ax: object = None
    bx: object = None
    gax: object = None
    gbx: object = None
