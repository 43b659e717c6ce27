"""Dtype names across formats, kept as strings so headers can be read without torch."""

from __future__ import annotations

from typing import Any

__all__ = ["SAFETENSORS_TO_NAME", "NAME_TO_SAFETENSORS", "STORAGE_TO_NAME", "BITS", "PACKED", "nbytes_of",
           "to_torch", "name_of", "from_safetensors", "to_safetensors", "unrepresentable"]

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
# complex128 has no safetensors code: safetensors and transformers refuse a "C128" header, so
# weightsmith never writes one

# safetensors codes that torch stores several values to one element: code -> (torch dtype name,
# values per element). An F4 header of shape [4, 6] is a float4_e2m1fn_x2 tensor of shape [4, 3]:
# safetensors counts the 4-bit values, torch the bytes that hold two of them.
PACKED: dict[str, tuple[str, int]] = {"F4": ("float4_e2m1fn_x2", 2)}

# bits per element, by torch dtype name
BITS: dict[str, int] = {
    "bool": 8, "uint8": 8, "int8": 8, "int16": 16, "uint16": 16, "float16": 16, "bfloat16": 16,
    "int32": 32, "uint32": 32, "float32": 32, "float64": 64, "int64": 64, "uint64": 64,
    "complex64": 64, "complex128": 128, "complex32": 32, "float8_e5m2": 8, "float8_e4m3fn": 8,
    "float8_e8m0fnu": 8, "float8_e4m3fnuz": 8, "float8_e5m2fnuz": 8, "float6_e2m3": 6,
    "float6_e3m2": 6, "float4_e2m1": 4, "float4_e2m1fn_x2": 8, "qint8": 8, "quint8": 8, "qint32": 32,
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


def from_safetensors(code: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
    """The torch dtype name and shape of a safetensors entry, ``None`` for an unknown code.

    Packed codes (`PACKED`) take torch's packed dtype and divide the last dimension, so that the
    element count times the element size is the entry's byte length. Where torch cannot hold the
    values that way (an odd last dimension, a 0-d tensor), the per-value name (``float4_e2m1``)
    and the header's shape are kept; `unrepresentable` then says why no tensor can be made.
    """
    name = SAFETENSORS_TO_NAME.get(code)
    if name is None:
        return None
    packed = PACKED.get(code)
    if packed is not None and shape and shape[-1] % packed[1] == 0:
        return packed[0], (*shape[:-1], shape[-1] // packed[1])
    return name, shape


def to_safetensors(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
    """The safetensors code and header shape of a torch dtype name and shape; ``None``: not storable.

    A packed dtype multiplies the last dimension (float4_e2m1fn_x2 ``[4, 3]`` is F4 ``[4, 6]``);
    a 0-d packed tensor has no dimension to multiply and reads back with another shape, so it is
    not storable.
    """
    for code, (packed, per) in PACKED.items():
        if name == packed:
            return (code, (*shape[:-1], shape[-1] * per)) if shape else None
    code = NAME_TO_SAFETENSORS.get(name)
    return None if code is None else (code, shape)


def unrepresentable(name: str) -> str | None:
    """Why no torch tensor can hold values of dtype ``name``; ``None`` when one can."""
    import torch

    for code, (packed, per) in PACKED.items():
        if SAFETENSORS_TO_NAME[code] == name:
            return (f"torch's {packed} holds {per} values per element, so the last dimension must be a "
                    f"multiple of {per}")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        return f"torch {torch.__version__} has no {name} dtype"
    return None


def to_torch(name: str) -> Any:
    """The ``torch.dtype`` for a dtype name."""
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        from ..errors import CheckpointError

        raise CheckpointError(f"dtype {name!r} cannot be a torch tensor: {unrepresentable(name)}")
    return value


def name_of(dtype: Any) -> str:
    """The dtype name of a ``torch.dtype`` (``torch.float32`` -> ``"float32"``)."""
    return str(dtype).removeprefix("torch.")
