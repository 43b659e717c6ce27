"""Merging checkpoints: model soups, task arithmetic, TIES, DARE, SLERP, model stock, layer stacking, LoRA.

``merge_plan`` says from headers alone what a merge will read and compute; ``merge`` streams it
to a file, a sharded folder or a live model; ``merge_lora`` and ``extract_lora`` fold a PEFT
adapter into its base and take one out of a fine-tune.
"""

from __future__ import annotations

from .lora import LoraReport, extract_lora, merge_lora
from .plan import MergePlan, MergeStep, merge_plan
from .run import MergeReport, merge

__all__ = ["merge", "merge_plan", "MergePlan", "MergeStep", "MergeReport", "merge_lora", "extract_lora",
           "LoraReport"]
