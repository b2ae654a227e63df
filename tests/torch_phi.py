"""A tiny frozen feature extractor for the tests (importable as ``tests.torch_phi:small_net``)."""

from __future__ import annotations

import torch


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())


class NotWeights:
    """Anything that is not a plain tensor dict: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.payload = "arbitrary object"
