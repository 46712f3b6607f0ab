"""Loss stage: symmetric InfoNCE and SigLIP's sigmoid loss, never building B x B in the fused paths.

`contrastive` holds the public functions and the plain reference; `kernels/` the chunked PyTorch and
Triton fast paths it dispatches to.
"""
from mmft.loss.contrastive import contrastive_loss, sigmoid_loss

__all__ = ["contrastive_loss", "sigmoid_loss"]
