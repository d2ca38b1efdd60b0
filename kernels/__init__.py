"""edgetune.kernels: the fused multi-branch adapter op (Triton + PyTorch paths)."""
