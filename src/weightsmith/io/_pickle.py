"""A restricted unpickler that executes nothing from the file.

Every global a pickle names resolves to a stand-in: allowlisted torch and container globals
to small pure-Python functions that record what the pickle describes (tensor rebuilds with
their storage key, dtype, shape and stride), everything else to an `Opaque` placeholder class
that records how it was used. So a checkpoint can be walked, its tensors located and its other
objects listed by class name, without importing torch or constructing anything it names.

How a global is used decides whether a file is safe to load:

- ``allowed``: on the allowlist (tensor rebuilds, storages, dtypes, ``OrderedDict``, ...);
- ``constructed``: a class instantiated without calling it (``NEWOBJ``, ``copyreg``
  reconstruction) — plain data such as ``argparse.Namespace``; the placeholder keeps its state;
- ``called``: called with arguments (``REDUCE``, ``INST``, ``OBJ``) — arbitrary code in a real
  unpickler, so loading such a file needs ``trust=True``.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._dtypes import BITS, STORAGE_TO_NAME

__all__ = ["StorageRef", "TensorRecord", "Opaque", "PickleScan", "scan_pickle", "scan_pickles"]


@dataclass(frozen=True)
class StorageRef:
    """A storage named by a persistent id: zip entry key, dtype, element count."""

    key: str
    dtype: str
    numel: int
    location: str = "cpu"
    view_offset: int = 0  # legacy format: element offset into the root storage


@dataclass
class TensorRecord:
    """A tensor as the pickle describes it; materialized later from its storage bytes."""

    storage: StorageRef | None
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False
    is_parameter: bool = False


class Opaque:
    """Stand-in for an object of a class that is not on the allowlist; never constructed."""

    _ws_global: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.__dict__["_ws_args"] = args
        obj.__dict__["_ws_state"] = None
        obj.__dict__["_ws_items"] = {}
        obj.__dict__["_ws_list"] = []
        _scan_of(cls).note(cls._ws_global, "constructed")
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _scan_of(type(self)).note(type(self)._ws_global, "called")
        self.__dict__["_ws_args"] = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_ws_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["_ws_items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["_ws_list"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["_ws_list"].extend(values)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__[name] = value

    def __reduce__(self) -> Any:  # pragma: no cover - never re-pickled
        raise TypeError("placeholder objects cannot be pickled")

    def __repr__(self) -> str:
        return f"<{self._ws_global} (not constructed)>"

    @property
    def ws_state(self) -> Any:
        """The state the pickle gave the object: its attribute dict, items or list."""
        state = self.__dict__["_ws_state"]
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) and state[0] is None:
            state = state[1]  # (None, slotstate)
        return state

    @property
    def ws_children(self) -> list[tuple[str, Any]]:
        """Named children for walking the object tree: state fields, items, list entries."""
        out: list[tuple[str, Any]] = []
        state = self.ws_state
        if isinstance(state, dict):
            out += [(str(k), v) for k, v in state.items()]
        out += [(str(k), v) for k, v in self.__dict__["_ws_items"].items()]
        out += [(str(i), v) for i, v in enumerate(self.__dict__["_ws_list"])]
        return out


@dataclass
class PickleScan:
    """What one walk of a pickle stream found."""

    objects: list[Any] = field(default_factory=list)
    globals: dict[str, set[str]] = field(default_factory=dict)
    tensors: int = 0

    def note(self, name: str, how: str) -> None:
        self.globals.setdefault(name, set()).add(how)

    @property
    def called(self) -> tuple[str, ...]:
        """Globals a real unpickler would call with arguments: loading needs trust."""
        return tuple(sorted(n for n, how in self.globals.items() if "called" in how))

    @property
    def constructed(self) -> tuple[str, ...]:
        """Classes instantiated as plain data, listed by name and never constructed."""
        return tuple(sorted(n for n, how in self.globals.items()
                            if "constructed" in how and "called" not in how))


_SCAN_ATTR = "_ws_scan"


def _scan_of(cls: type) -> PickleScan:
    return getattr(cls, _SCAN_ATTR)


class _Token(str):
    """A global resolved to its name (dtypes, layouts, storage types)."""


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(d) is int and abs(d) < 1 << 62 for d in value):
        raise pickle.UnpicklingError(f"a tensor {what} is {value!r:.60}, not a tuple of 64-bit integers")
    return tuple(value)


def _rebuild_tensor_v2(storage: Any, offset: int, size: Any, stride: Any, requires_grad: bool = False,
                       *_rest: Any) -> TensorRecord:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    if type(offset) is not int or abs(offset) >= 1 << 62:
        raise pickle.UnpicklingError(f"a tensor offset is {offset!r:.60}, not a 64-bit integer")
    return TensorRecord(storage, offset, _dims(size, "shape"), _dims(stride, "stride"), storage.dtype,
                        bool(requires_grad))


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any) -> TensorRecord:
    return _rebuild_tensor_v2(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: bool = True, *_rest: Any) -> Any:
    if isinstance(data, TensorRecord):
        data.requires_grad = bool(requires_grad)
        data.is_parameter = True
    return data


def _rebuild_meta(dtype: Any, size: Any, stride: Any, requires_grad: bool = False, *_rest: Any) -> TensorRecord:
    return TensorRecord(None, 0, _dims(size, "shape"), _dims(stride, "stride"), str(dtype).removeprefix("torch."),
                        bool(requires_grad))


def _rebuild_from_type_v2(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    return func(*args) if callable(func) else func


class _AttrDict(dict):  # type: ignore[type-arg]
    """A plain dict that also takes attributes: ``state_dict()`` pickles its ``_metadata`` as one."""


def _ordered_dict(*args: Any) -> dict[Any, Any]:
    return _AttrDict(*args)


def _size(*args: Any) -> tuple[int, ...]:
    return tuple(args[0]) if args else ()


def _encode(text: Any, encoding: str = "utf-8") -> bytes:
    if encoding.lower().replace("-", "") not in {"latin1", "utf8", "ascii"}:
        raise pickle.UnpicklingError(f"refusing codec {encoding!r}")
    return str(text).encode(encoding)


def _bytearray(*args: Any) -> bytearray:
    # pickles rebuild a bytearray from its bytes; bytearray(<int>) would let a few bytes of
    # file allocate and zero-fill any amount of memory
    if args and not isinstance(args[0], (bytes, str)):
        raise pickle.UnpicklingError(f"refusing bytearray({type(args[0]).__name__})")
    return bytearray(*args)


# bases whose __init__ copyreg._reconstructor may call without running anything of note
_PLAIN_BASES = {"builtins.object", "builtins.dict", "builtins.list", "builtins.set", "builtins.tuple"}


def _reconstructor(cls: Any, base: Any = None, _state: Any = None) -> Any:
    # a real unpickler calls base.__init__(obj, state): code, unless the base is a plain type
    if isinstance(base, type) and issubclass(base, Opaque) and base._ws_global not in _PLAIN_BASES:
        _scan_of(base).note(base._ws_global, "called")
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls.__new__(cls)
    return cls


def _newobj(cls: Any, *args: Any) -> Any:
    return _reconstructor(cls)


def _name_token(_mod: str, name: str) -> Callable[..., Any]:
    return lambda *args: _Token(str(args[0]) if args else name)


_TORCH_FUNCS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "torch.Size": _size,
    "torch.device": lambda *a: _Token(":".join(str(x) for x in a)),
    "torch.serialization._get_layout": lambda name="": _Token(str(name)),
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING": lambda v=0: _Token(f"mem_format_{v}"),
    "_codecs.encode": _encode,
    "pathlib.PosixPath": lambda *a: _Token("/".join(map(str, a))),
    "pathlib.PurePosixPath": lambda *a: _Token("/".join(map(str, a))),
    "pathlib.WindowsPath": lambda *a: _Token("\\".join(map(str, a))),
    "pathlib.PureWindowsPath": lambda *a: _Token("\\".join(map(str, a))),
    "copyreg._reconstructor": _reconstructor,
    "copyreg.__newobj__": _newobj,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": _bytearray,
}

_TORCH_DTYPE_NAMES = {
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int8", "uint8", "int16",
    "int32", "int64", "long", "int", "short", "bool", "complex64", "complex128", "uint16", "uint32",
    "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "strided", "sparse_coo", "contiguous_format", "preserve_format", "channels_last",
}


def is_allowed(module: str, name: str) -> bool:
    """Whether ``module.name`` is on the allowlist of globals a checkpoint may use."""
    full = f"{module}.{name}"
    return (full in _TORCH_FUNCS
            or (module == "torch" and (name in STORAGE_TO_NAME or name == "UntypedStorage"
                                       or name in _TORCH_DTYPE_NAMES)))


class _Sealed:
    """An allowlisted function as a pickle sees it: callable, but closed to ``BUILD``.

    Handing out the function itself would let a pickle ``BUILD`` onto it (``setattr`` of
    ``__defaults__`` and the like), changing how every later file in the process is read.
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"the pickle sets state on the function {self._fn.__name__}")


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream: Any, scan: PickleScan, legacy: bool) -> None:
        super().__init__(stream)
        self._scan = scan
        self._legacy = legacy
        self._placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # torch.save writes protocol 2, which spells Python 3 names the Python 2 way
        # (``__builtin__.set``, ``copy_reg._reconstructor``); map them as pickle itself does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in _TORCH_FUNCS:
            self._scan.note(full, "allowed")
            fn = _TORCH_FUNCS[full]
            return _Sealed(fn) if isinstance(fn, types.FunctionType) else fn
        if module == "torch" and (name in STORAGE_TO_NAME or name == "UntypedStorage"):
            self._scan.note(full, "allowed")
            return _Token(STORAGE_TO_NAME.get(name, "uint8"))
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            self._scan.note(full, "allowed")
            return _Token(name)
        self._scan.note(full, "imported")
        cls = self._placeholders.get(full)
        if cls is None:
            cls = type(name if name.isidentifier() else "Global", (Opaque,),
                       {"_ws_global": full, _SCAN_ATTR: self._scan, "__module__": "weightsmith.opaque"})
            self._placeholders[full] = cls
        return cls

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, location, numel = pid[:5]
        if not isinstance(stype, _Token) or stype not in BITS or stype.startswith("q"):
            # quantized storages come with _rebuild_qtensor, which is not on the allowlist
            raise pickle.UnpicklingError(f"unsupported storage type {stype!r:.80}")
        view_offset = 0
        if self._legacy and len(pid) > 5 and pid[5] is not None:
            _view_key, view_offset, numel = pid[5]
        if type(numel) is not int or type(view_offset) is not int or numel < 0 or view_offset < 0:
            raise pickle.UnpicklingError(f"storage {key!r:.40} has a bad size {numel!r:.40} or offset")
        self._scan.tensors += 1
        return StorageRef(str(key), str(stype), numel, str(location), view_offset)


def scan_pickle(data: bytes, *, legacy: bool = False) -> PickleScan:
    """Walk one pickle; ``scan.objects[0]`` is the object tree with stand-ins."""
    return scan_pickles(io.BytesIO(data), count=1, legacy=legacy)


def scan_pickles(stream: Any, *, count: int | None = None, legacy: bool = False) -> PickleScan:
    """Walk ``count`` consecutive pickles from a binary stream (all of them when ``None``).

    The stream is left just after the last pickle read.
    """
    scan = PickleScan()
    while count is None or len(scan.objects) < count:
        if count is None:
            if not stream.read(1):
                break
            stream.seek(-1, io.SEEK_CUR)
        unpickler = _Unpickler(stream, scan, legacy)
        try:
            scan.objects.append(unpickler.load())
        except EOFError:
            raise _failed("the pickle stream ends early (truncated?)", scan) from None
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError,
                IndexError, UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as e:
            raise _failed(f"{type(e).__name__}: {e}", scan) from e
    return scan


def _failed(message: str, scan: PickleScan) -> pickle.UnpicklingError:
    """The error for an unreadable pickle, carrying what was read before it (``.scan``).

    A real unpickler runs each call as it reaches it, so a pickle that calls code and is then
    malformed is as unsafe as a well-formed one; callers check ``error.scan.called``.
    """
    error = pickle.UnpicklingError(message)
    error.scan = scan  # type: ignore[attr-defined]
    return error
