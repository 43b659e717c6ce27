"""Run by the transformers 4.x environment: ``from_pretrained`` each folder, compare with its reference.

Usage: ``python _tf4_load.py JOBS.json``, where the file lists ``{"name", "folder", "reference",
"architecture"}``; prints one JSON object: the transformers version and, per name, ``"ok"`` or the
error or the keys whose values differ. The reference is a safetensors file written by safetensors.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
import transformers
from safetensors.torch import load_file


def main(jobs_path: str) -> int:
    results: dict[str, str] = {}
    for job in json.loads(open(jobs_path, encoding="utf-8").read()):
        try:
            model = getattr(transformers, job["architecture"]).from_pretrained(job["folder"])
            loaded = model.state_dict()
            want = load_file(job["reference"])
            bad = [k for k, v in want.items() if k not in loaded or not torch.equal(loaded[k], v)]
            results[job["name"]] = "ok" if not bad else f"values differ: {', '.join(bad[:5])}"
        except Exception as e:  # reported to the test, which fails with it
            lines = traceback.format_exception_only(type(e), e)
            results[job["name"]] = "".join(lines).strip()
    print(json.dumps({"version": transformers.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
