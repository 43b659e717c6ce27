"""LoRA adapters: fold a PEFT adapter into its base, or take one out of a fine-tune."""

from __future__ import annotations

__all__ = ["merge_lora", "extract_lora", "LoraReport"]
