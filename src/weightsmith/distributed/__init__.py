"""Scale out: ``torch.distributed.checkpoint`` folders and models sharded across ranks.

- `agree`: every rank learns every rank's failure, so all raise or none does.
- `reader`: `WeightsmithDcpReader`, a ``FileSystemReader`` for ``dcp.load`` that reads
  ``.metadata`` and every chunk with weightsmith's restricted readers (nothing unpickled).
- `dcp_save`: `save_dcp` writes a DCP folder atomically (staged beside the target, swapped in
  once every rank has written); ``weightsmith.save(..., format="dcp")`` routes here.
- `sharded_load`: `load_sharded_` loads any checkpoint into a model whose parameters are
  ``DTensor`` shards, all or nothing across ranks, over the engine of `warmstart.execute`;
  ``weightsmith.load_`` routes here.

Every function here is collective when a process group is initialized: every rank calls it.
"""

from __future__ import annotations

from .dcp_save import save_dcp
from .reader import WeightsmithDcpReader
from .sharded_load import is_sharded, load_sharded_

__all__ = ["save_dcp", "load_sharded_", "is_sharded", "WeightsmithDcpReader"]
