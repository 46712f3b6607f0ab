"""Fast paths for mmft's contrastive losses; mmft.loss.contrastive dispatches to them and holds the reference.

- chunked: PyTorch autograd.Function over logit tiles (CPU and CUDA, any float dtype).
- infonce_triton, sigmoid_triton: fused Triton kernels for CUDA (imported only when used, so that
  importing mmft never imports triton); _triton_common holds their shared pieces and tuning configs.
"""
