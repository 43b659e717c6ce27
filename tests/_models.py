"""Seeded builders of the small example models, for tests that need several fresh copies."""

import torch
from torch import nn


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def make_tied() -> nn.Sequential:
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), shared, nn.ReLU(), shared)
