"""`Entries`: the tensors a writer stores, each once, with the ties between keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Entries", "Progress"]

Progress = Callable[[int, int, str], None]


@dataclass
class Entries:
    """Tensors to write, in order, each stored once; ``ties`` maps an alias key to the stored key.

    Items hold tensors, or, with ``materialize``, meta tensors giving only shape and dtype:
    ``materialize(key, spec)`` returns the tensor when its turn comes, so a source streams one
    tensor at a time. ``written(key)`` is called once a tensor's bytes are out (a source
    releases its pages there).
    """

    items: list[tuple[str, Any]]
    ties: dict[str, str] = field(default_factory=dict)
    materialize: Callable[[str, Any], Any] | None = None
    written: Callable[[str], None] | None = None

    @staticmethod
    def nbytes_of(t: Any) -> int:
        return int(t.numel()) * int(t.element_size())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (tied tensors once)."""
        return sum(self.nbytes_of(t) for _, t in self.items)

    @property
    def count(self) -> int:
        """Keys written, tied keys included."""
        return len(self.items) + len(self.ties)

    def only(self, keys: list[str]) -> Entries:
        """These stored keys (in this order) and the ties that point at them."""
        kept = set(keys)
        by_key = dict(self.items)
        return Entries([(k, by_key[k]) for k in keys], {a: s for a, s in self.ties.items() if s in kept},
                       self.materialize, self.written)

    def tensor(self, key: str, spec: Any) -> Any:
        """The tensor to write for ``key``: ``spec`` itself, or what ``materialize`` makes of it."""
        from ...errors import SaveError

        if self.materialize is None:
            return spec
        t = self.materialize(key, spec)
        if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
            raise SaveError(f"tensor {key!r} arrived as {t.dtype}{list(t.shape)}, but the header was written "
                            f"for {spec.dtype}{list(spec.shape)}")
        return t
