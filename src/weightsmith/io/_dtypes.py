"""Dtype names across formats, kept as strings so headers can be read without torch."""

from __future__ import annotations

from typing import Any

__all__ = ["SAFETENSORS_TO_NAME", "NAME_TO_SAFETENSORS", "STORAGE_TO_NAME", "BITS", "nbytes_of",
           "to_torch", "name_of"]

# safetensors code -> torch dtype name
SAFETENSORS_TO_NAME: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "F64": "float64", "I64": "int64", "U64": "uint64", "C64": "complex64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F6_E2M3": "float6_e2m3", "F6_E3M2": "float6_e3m2", "F4": "float4_e2m1",
}
NAME_TO_SAFETENSORS: dict[str, str] = {v: k for k, v in SAFETENSORS_TO_NAME.items()}
NAME_TO_SAFETENSORS["complex128"] = "C128"  # not in the reference list; written only if asked

# bits per element, by torch dtype name
BITS: dict[str, int] = {
    "bool": 8, "uint8": 8, "int8": 8, "int16": 16, "uint16": 16, "float16": 16, "bfloat16": 16,
    "int32": 32, "uint32": 32, "float32": 32, "float64": 64, "int64": 64, "uint64": 64,
    "complex64": 64, "complex128": 128, "complex32": 32, "float8_e5m2": 8, "float8_e4m3fn": 8,
    "float8_e8m0fnu": 8, "float8_e4m3fnuz": 8, "float8_e5m2fnuz": 8, "float6_e2m3": 6,
    "float6_e3m2": 6, "float4_e2m1": 4, "qint8": 8, "quint8": 8, "qint32": 32,
}

# legacy typed-storage class names in torch pickles -> torch dtype name
STORAGE_TO_NAME: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
}


def nbytes_of(dtype: str, numel: int) -> int:
    """Bytes that ``numel`` elements of ``dtype`` occupy (sub-byte kinds packed)."""
    bits = BITS[dtype] * numel
    return (bits + 7) // 8


def to_torch(name: str) -> Any:
    """The ``torch.dtype`` for a dtype name."""
    import torch

    if name == "float4_e2m1":
        name = "float4_e2m1fn_x2"
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        from ..errors import CheckpointError

        raise CheckpointError(f"dtype {name!r} is not supported by this torch ({torch.__version__})")
    return value


def name_of(dtype: Any) -> str:
    """The dtype name of a ``torch.dtype`` (``torch.float32`` -> ``"float32"``)."""
    return str(dtype).removeprefix("torch.")
