"""A one-process gloo group and a 1-rank device mesh, for tests of DTensor handling in one process."""

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest


@contextlib.contextmanager
def one_rank_mesh() -> Iterator[Any]:
    """A 1-rank CPU mesh, its process group destroyed on exit (skips where torch lacks distributed)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without distributed")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
