"""Writers, one module per format, through which both `save` and `convert` write.

Each takes `Entries` (every tensor stored once, ties recorded) and writes its format atomically:
`write_safetensors_file`, `write_sharded_folder` (a Hugging Face folder: shards, then the index;
other files in the folder are kept) and `write_torch_file`. What every file of a format carries
(``"format": "pt"``, tie and checksum metadata) is decided here, once.
"""

from __future__ import annotations

from ._entries import Entries
from .safetensors import write_safetensors, write_safetensors_file
from .sharded import write_sharded_folder
from .torchfile import write_torch_file

__all__ = ["Entries", "write_safetensors", "write_safetensors_file", "write_sharded_folder", "write_torch_file"]
