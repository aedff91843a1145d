"""PyTorch window-attention backend: the reference, runs on any device."""
from __future__ import annotations

import torch

from hetero.backends import WindowBackend
from hetero.reference import window_attention
from hetero.types import PartialAttention


class TorchWindowBackend(WindowBackend):
    name = "torch"
    devices = ("cpu", "cuda")

    def __call__(self, q, k, v, lengths, scale) -> PartialAttention:
        return window_attention(q, k, v, lengths, scale=scale, compute_dtype=torch.float32)
