"""PyTorch sparse host-attention backend: the reference (gather + matmul), float32 compute."""
from __future__ import annotations

import torch

from hetero.backends import HostBackend
from hetero.reference import sparse_attention
from hetero.types import PartialAttention


class TorchSparseBackend(HostBackend):
    name = "torch"

    def __call__(self, q, host, selection, scale) -> PartialAttention:
        return sparse_attention(q, host, selection, scale=scale, compute_dtype=torch.float32)
