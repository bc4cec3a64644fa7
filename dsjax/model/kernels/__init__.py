"""Accelerator kernels (Pallas). Each module offers a kernel, its pure-XLA reference and `supported()`."""

from dsjax.model.kernels.fp8_gemm import (
    block_scaled_matmul,
    block_scaled_matmul_reference,
    supported,
)

__all__ = ["block_scaled_matmul", "block_scaled_matmul_reference", "supported"]
