"""A pickle interpreter that executes nothing from the file, and sees every call it would make.

One iterative opcode machine (explicit stack, memo as a dict, no recursion) both reads a
checkpoint's pickle and decides whether a real unpickler would run code: what is scanned is
what is read. Every global resolves to a stand-in: allowlisted torch and container globals to
small pure-Python functions that record what the pickle describes (tensor rebuilds with their
storage key, dtype, shape and stride), everything else to a placeholder class (`Opaque`)
that records how it was used. Nothing is imported, constructed or called.

A real unpickler calls code at more places than ``REDUCE``, and each is modelled:

- ``REDUCE``, ``INST``, ``OBJ``: a call of whatever the stack holds;
- ``NEWOBJ``/``NEWOBJ_EX`` (and ``copyreg.__newobj__``): ``cls.__new__(cls, *args)``, which
  with arguments builds lazy iterators such as ``map(os.system, ...)``;
- ``copyreg._reconstructor(cls, base, state)``: ``base.__init__(obj, state)``, so a ``list``
  or ``dict`` base iterates ``state`` (a lazy ``map`` or ``itertools.starmap`` then runs);
- ``BUILD``: ``__setstate__`` or a ``__dict__`` update; ``APPEND(S)``, ``SETITEM(S)``,
  ``ADDITEMS``: ``append``/``extend``/``__setitem__``/``add`` of whatever object is below;
- dict keys and set members are hashed: ``__hash__`` of their class;
- allowlisted functions that iterate or test an argument (``OrderedDict(x)``, ``set(x)``,
  ``_rebuild_tensor_v2``'s hooks) do so only for plain containers.

How a global is used decides whether a file is safe:

- ``allowed``: on the allowlist (tensor rebuilds, storages, dtypes, ``OrderedDict``, ...);
- ``imported``: named only (a real unpickler still imports its module);
- ``constructed``: a class instantiated as plain data (``cls.__new__(cls)`` with no
  arguments, then its state); the placeholder keeps the state;
- ``called``: anything else above — arbitrary code in a real unpickler, so loading such a
  file needs ``trust=True``; `PickleScan.findings` names the global and the opcode position.

Resources are bounded by the file's size: each object is charged against a byte budget
(`budget_for`: twice the size plus 192 MiB; the walk raises past it), so a few bytes cannot
claim gigabytes (``LONG_BINPUT 2**29`` only makes one dict entry), and the walk is one pass
over the opcodes, linear in their number.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._dtypes import BITS, STORAGE_TO_NAME

__all__ = ["StorageRef", "TensorRecord", "Opaque", "PickleScan", "Finding", "scan_pickle", "scan_pickles",
           "is_allowed", "budget_for", "KNOWN_PLAIN", "MAX_NUMEL"]

MAX_NUMEL = (1 << 63) - 1  # torch counts elements in an int64
_BASE_BUDGET = 192 << 20  # bytes of objects any pickle may build, besides twice the file's size
_CHUNK = 1 << 20


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
    """A tensor as the pickle describes it; materialized later from its storage bytes.

    ``dtype`` is the tensor's own dtype; it differs from ``storage.dtype`` when the storage is
    untyped (``torch.storage.UntypedStorage``: bytes, viewed as ``dtype``).
    """

    storage: StorageRef | None
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False
    is_parameter: bool = False


class Opaque:
    """Stand-in for an object of a class that is not on the allowlist; never constructed.

    The placeholder *classes* (one per global) derive from it; their instances carry what the
    pickle gave them: constructor arguments, state, items and list entries.
    """

    _ws_global: str = "?"

    def __reduce__(self) -> Any:  # pragma: no cover - never re-pickled
        raise TypeError("placeholder objects cannot be pickled")

    def __repr__(self) -> str:
        return f"<{self._ws_global} (not constructed)>"

    @property
    def ws_state(self) -> Any:
        """The state the pickle gave the object: its attribute dict, items or list."""
        state = self.__dict__.get("_ws_state")
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
        out += [(str(k), v) for k, v in self.__dict__.get("_ws_items", {}).items()]
        out += [(str(i), v) for i, v in enumerate(self.__dict__.get("_ws_list", []))]
        return out


def _instance(cls: type, args: tuple[Any, ...] = ()) -> Opaque:
    # the machine charges its budget for each placeholder instance (four dicts)
    obj = object.__new__(cls)
    obj.__dict__.update(_ws_args=args, _ws_state=None, _ws_items={}, _ws_list=[])
    return obj


@dataclass(frozen=True)
class Finding:
    """One place where a real unpickler would run code: the global, the opcode and its byte offset."""

    name: str
    opcode: str
    position: int
    why: str

    def __str__(self) -> str:
        return f"{self.name}: {self.why} ({self.opcode} at byte {self.position})"


@dataclass
class PickleScan:
    """What one walk of a pickle stream found."""

    objects: list[Any] = field(default_factory=list)
    globals: dict[str, set[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    tensors: int = 0

    def note(self, name: str, how: str) -> None:
        self.globals.setdefault(name, set()).add(how)

    @property
    def called(self) -> tuple[str, ...]:
        """Globals a real unpickler would call (or run code of): loading needs trust."""
        return tuple(sorted(n for n, how in self.globals.items() if "called" in how))

    @property
    def constructed(self) -> tuple[str, ...]:
        """Classes instantiated as plain data, listed by name and never constructed."""
        return tuple(sorted(n for n, how in self.globals.items()
                            if "constructed" in how and "called" not in how))


class _Token(str):
    """A global resolved to its name (dtypes, layouts, storage types, tensor classes)."""


class _Func:
    """An allowlisted function as a pickle sees it: callable through the machine only.

    ``newobj``: it also stands for a class ``NEWOBJ`` may instantiate without arguments.
    """

    __slots__ = ("name", "fn", "newobj")

    def __init__(self, name: str, fn: Callable[..., Any], newobj: bool = False) -> None:
        self.name, self.fn, self.newobj = name, fn, newobj

    def __repr__(self) -> str:
        return f"<allowlisted {self.name}>"


class _Bad(pickle.UnpicklingError):
    """The pickle is malformed or describes something no checkpoint holds."""


# -- the allowlist ---------------------------------------------------------------------------------
# classes a real unpickler builds as plain data: object.__new__ and a __dict__ update, with no
# __new__, __init__, __setstate__, __setattr__ or __hash__ of their own beyond torch's and the
# standard library's
KNOWN_PLAIN = frozenset({
    "argparse.Namespace",
    "types.SimpleNamespace",
    "builtins.object",
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
})
_PLAIN_TYPES = {"builtins.list": list, "builtins.dict": dict, "builtins.tuple": tuple}
_TENSOR_TYPES = {"torch._tensor.Tensor", "torch.Tensor", "torch.nn.parameter.Parameter"}

_TORCH_DTYPE_NAMES = {
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int8", "uint8", "int16",
    "int32", "int64", "long", "int", "short", "bool", "complex64", "complex128", "uint16", "uint32",
    "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
    "strided", "sparse_coo", "contiguous_format", "preserve_format", "channels_last",
}
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
                  "short": "int16"}


def _is_data(value: Any) -> bool:
    """Whether a value is plain data a real unpickler may iterate, test or store without calling code."""
    if isinstance(value, (_Func, type)):
        return False
    if isinstance(value, Opaque):
        return type(value)._ws_global in KNOWN_PLAIN
    return True


def _short(value: Any) -> str:
    """A bounded description of a value for an error message (never a deep repr)."""
    if isinstance(value, (int, float, bool)) or value is None:
        text = repr(value)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:40])
    else:
        text = type(value).__name__
    return text[:60]


def _flag(value: Any, what: str) -> bool:
    # torch assigns requires_grad through a C setter that takes a bool and nothing else
    if type(value) not in (bool, int):
        raise _Bad(f"{what} is {_short(value)}, not a bool")
    return bool(value)


def _plain_state(value: Any) -> bool:
    """Whether torch's ``_set_obj_state`` would only store ``value``: attributes by plain names."""
    parts = value if isinstance(value, tuple) and len(value) == 2 else (value,)
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, dict) or not all(
                isinstance(k, str) and not k.startswith("__") and _is_data(v) for k, v in part.items()):
            return False
    return True


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64 or not all(
            type(d) is int and abs(d) < 1 << 62 for d in value):
        raise _Bad(f"a tensor {what} is {_short(value)}, not a tuple of 64-bit integers")
    return tuple(value)


def _numel_checked(shape: tuple[int, ...]) -> None:
    numel = 1
    for d in shape:
        if d < 0:
            raise _Bad(f"a tensor has a negative dimension in its shape {list(shape)}")
        numel *= d
    if numel > MAX_NUMEL:
        raise _Bad(f"a tensor of shape {list(shape)} has {numel:,} elements, more than torch can index (2**63)")


class _Machine:
    """One pickle, opcode by opcode. See the module docstring for what each opcode means here."""

    def __init__(self, stream: Any, scan: PickleScan, legacy: bool, budget: int,
                 placeholders: dict[str, type]) -> None:
        self.stream = stream
        self.base = stream.tell()
        self.buf = b""
        self.i = 0
        self.scan = scan
        self.legacy = legacy
        self.budget = budget
        self.placeholders = placeholders
        self.at = 0  # the current opcode's index in buf, for findings

    # -- bytes ------------------------------------------------------------------------------
    def _take(self, n: int) -> bytes:
        i = self.i
        if i + n > len(self.buf):
            if n < 0:
                raise _Bad("a negative length")
            self._fill(n)
            i = self.i
        self.i = i + n
        return self.buf[i:i + n]

    def _byte(self) -> int:
        i = self.i
        if i >= len(self.buf):
            self._fill(1)
            i = self.i
        self.i = i + 1
        return self.buf[i]

    def _fill(self, n: int) -> None:
        """Make ``n`` bytes available at ``self.i``, keeping the current opcode's byte."""
        if n - (len(self.buf) - self.i) > self.budget:
            raise _Bad(f"an opcode declares {n:,} bytes, more than this pickle may hold")
        more = self.stream.read(max(n - (len(self.buf) - self.i), _CHUNK))
        self._shift(more)
        if len(self.buf) - self.i < n:
            raise EOFError

    def _shift(self, more: bytes) -> None:
        keep = min(self.at, self.i)
        self.buf = self.buf[keep:] + more
        self.base += keep
        self.i -= keep
        self.at -= keep

    def _line(self) -> bytes:
        end = self.buf.find(b"\n", self.i)
        while end < 0:
            if len(self.buf) - self.i > 1 << 20:
                raise _Bad("a text opcode argument longer than 1 MiB")
            more = self.stream.read(_CHUNK)
            if not more:
                raise EOFError
            self._shift(more)
            end = self.buf.find(b"\n", self.i)
        out = self.buf[self.i:end]
        self.i = end + 1
        return out

    def _charge(self, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise _Bad("the pickle builds more objects than its size allows (a resource bomb?)")

    # -- findings ---------------------------------------------------------------------------
    @property
    def pos(self) -> int:
        """The current opcode's byte offset in the stream."""
        return self.base + self.at

    @property
    def opname(self) -> str:
        code = self.buf[self.at]
        return _OPNAMES.get(code, f"0x{code:02x}")

    def _name(self, value: Any) -> str:
        if isinstance(value, type) and issubclass(value, Opaque):
            return value._ws_global
        if isinstance(value, Opaque):
            return type(value)._ws_global
        if isinstance(value, _Func):
            return value.name
        return f"<{type(value).__name__}>"

    def _call(self, target: Any, why: str, args: tuple[Any, ...] = ()) -> Opaque:
        """Record a call a real unpickler would make; the globals handed to it may be called too."""
        name = self._name(target)
        self.scan.note(name, "called")
        self.scan.findings.append(Finding(name, self.opname, self.pos, why))
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, Opaque) or isinstance(arg, Opaque) and not _is_data(arg):
                self.scan.note(self._name(arg), "called")
                self.scan.findings.append(Finding(self._name(arg), self.opname, self.pos,
                                                  f"handed to {name}, which may call it"))
        return _instance(self._placeholder(f"{name}(...)"))

    def _method(self, obj: Opaque, method: str) -> None:
        """``APPENDS``/``SETITEMS``/``ADDITEMS``: a method of the object's class runs for each item.

        On an instance of a class built as data (``cls.__new__(cls)``, a ``dict`` or ``list``
        subclass such as Lightning's ``AttributeDict``) that is the class's own code: not plain
        data, but nothing to model, as the placeholder keeps the items. On anything else (the
        result of a call, a known data class without such a method) it is a call.
        """
        name = self._name(obj)
        how = self.scan.globals.get(name, set())
        if "constructed" in how and name not in KNOWN_PLAIN:
            self.scan.findings.append(Finding(name, self.opname, self.pos, f"its {method} runs for each item"))
        else:
            self._call(obj, f"its {method} runs for each item")

    def _key(self, key: Any, owner: str) -> Any:
        """A dict key or set member: hashed by a real unpickler."""
        budget = [64]
        stack = [(key, 0)]
        while stack:
            k, depth = stack.pop()
            if isinstance(k, (tuple, frozenset)):
                budget[0] -= len(k)
                if depth > 8 or budget[0] < 0:
                    raise _Bad(f"a key of {owner} is a tuple nested too deep to be a checkpoint key")
                stack.extend((x, depth + 1) for x in k)
            elif isinstance(k, (list, dict, set, bytearray)):
                raise _Bad(f"a key of {owner} is an unhashable {type(k).__name__}")
            elif not _is_data(k):
                self._call(k, f"hashed as a key of {owner} (its __hash__ runs)")
        return key

    # -- globals ----------------------------------------------------------------------------
    def _placeholder(self, full: str) -> type:
        cls = self.placeholders.get(full)
        if cls is None:
            short = full.rpartition(".")[2]
            cls = type(short if short.isidentifier() else "Global", (Opaque,),
                       {"_ws_global": full, "__module__": "weightsmith.opaque"})
            self.placeholders[full] = cls
        return cls

    def _global(self, module: str, name: str) -> Any:
        # torch.save writes protocol 2, which spells Python 3 names the Python 2 way
        # (``__builtin__.set``, ``copy_reg._reconstructor``); map them as pickle itself does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        fn = _FUNCS.get(full)
        if fn is not None:
            self.scan.note(full, "allowed")
            return fn
        token = _token(module, name)
        if token is not None:
            self.scan.note(full, "allowed")
            return token
        self.scan.note(full, "imported")
        return self._placeholder(full)

    # -- constructing -----------------------------------------------------------------------
    def _new(self, cls: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        """``cls.__new__(cls, *args, **kwargs)``, as ``NEWOBJ``/``NEWOBJ_EX``/``__newobj__`` do."""
        if isinstance(cls, _Func) and cls.newobj and not args and not kwargs:
            return cls.fn(self)
        if isinstance(cls, type) and issubclass(cls, Opaque):
            if args or kwargs:
                return self._call(cls, "instantiated with arguments (its __new__ runs on them)", (*args,))
            plain = _PLAIN_TYPES.get(cls._ws_global)
            if plain is not None:
                return plain()
            self.scan.note(cls._ws_global, "constructed")
            return _instance(cls)
        if isinstance(cls, _Token) and cls in _TENSOR_TYPES:
            return self._call(_instance(self._placeholder(str(cls))), "a tensor built by __new__")
        return self._call(cls, "instantiated (not a class a checkpoint holds)", (*args,))

    def _reconstruct(self, cls: Any, base: Any = None, state: Any = None) -> Any:
        """``copyreg._reconstructor``: ``base.__new__(cls, state)`` then ``base.__init__(obj, state)``."""
        base_name = self._name(base)
        if base_name == "builtins.object":  # object.__new__(cls): the state is not used
            return self._new(cls, (), None)
        if base_name in _PLAIN_TYPES and isinstance(cls, type) and issubclass(cls, Opaque):
            if not isinstance(state, (list, tuple, dict, str, bytes)) or not _is_data(state):
                return self._call(base, f"{base_name}.__init__ iterates a {self._name(state)}", (state,))
            if isinstance(state, dict):
                for k in state:
                    self._key(k, base_name)
            if cls._ws_global == base_name:
                return _PLAIN_TYPES[base_name](state)
            self.scan.note(cls._ws_global, "constructed")
            obj = _instance(cls)
            if isinstance(state, dict):
                obj.__dict__["_ws_items"].update(state)
            else:
                obj.__dict__["_ws_list"].extend(state)
            return obj
        return self._call(base, f"{base_name}.__init__ runs on the object being rebuilt", (cls, state))

    def _apply(self, fn: Any, args: Any) -> Any:
        """``REDUCE``: ``fn(*args)``."""
        if not isinstance(args, tuple):
            raise _Bad(f"REDUCE with arguments {_short(args)}, not a tuple")
        if isinstance(fn, _Func):
            return fn.fn(self, *args)
        if isinstance(fn, type) and issubclass(fn, Opaque) or isinstance(fn, Opaque):
            return self._call(fn, "called", args)
        raise _Bad(f"the pickle calls a {_short(fn)}, which is not callable")

    def _build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, Opaque):
            if not _is_data(obj):
                self.scan.note(self._name(obj), "constructed")  # its __setstate__ may run: not plain data
            obj.__dict__["_ws_state"] = state
        elif isinstance(obj, type) and issubclass(obj, Opaque):
            self._call(obj, "BUILD sets attributes on the class itself")
        elif isinstance(obj, _Func):
            raise _Bad(f"the pickle sets state on the function {obj.name}")
        elif isinstance(obj, TensorRecord):
            raise _Bad("the pickle sets state on a tensor after rebuilding it (BUILD on a tensor record)")
        elif isinstance(obj, _AttrDict) and isinstance(state, dict):
            for k, v in state.items():  # OrderedDict keeps attributes, such as state_dict()'s _metadata
                if isinstance(k, str):
                    obj.__dict__[k] = v
        else:
            raise _Bad(f"BUILD on a {_short(obj)}, which takes no state")

    def _persistent(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise _Bad(f"unsupported persistent id {_short(pid)}")
        _, stype, key, location, numel = pid[:5]
        if not isinstance(stype, _Token) or stype not in BITS or stype.startswith("q"):
            # quantized storages come with _rebuild_qtensor, which is not on the allowlist
            raise _Bad(f"unsupported storage type {_short(stype)}")
        view_offset = 0
        if self.legacy and len(pid) > 5 and pid[5] is not None:
            if not (isinstance(pid[5], tuple) and len(pid[5]) == 3):
                raise _Bad(f"storage {_short(key)} has a damaged view record")
            _view_key, view_offset, numel = pid[5]
        if type(numel) is not int or type(view_offset) is not int or not 0 <= numel < 1 << 62 \
                or not 0 <= view_offset < 1 << 62:
            raise _Bad(f"storage {_short(key)} has a bad size {_short(numel)} or offset")
        if not isinstance(key, (str, int)) or not isinstance(location, str):
            raise _Bad(f"storage key {_short(key)} is not a name")
        self.scan.tensors += 1
        return StorageRef(str(key), str(stype), numel, str(location), view_offset)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> Any:  # noqa: C901 - one branch per opcode reads best as one table
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}
        take, charge, byte = self._take, self._charge, self._byte

        def pop_mark() -> list[Any]:
            if not marks:
                raise _Bad("an opcode needs a MARK that is not there")
            k = marks.pop()
            items = stack[k:]
            del stack[k:]
            return items

        ops = 0
        while True:
            at = self.i
            if at >= len(self.buf):
                self._fill(1)
                at = self.i
            code = self.buf[at]
            self.i = at + 1
            self.at = at
            ops += 1
            if not ops & 0xFFF:
                charge(8 << 12)  # a stack slot per opcode
            try:
                if code == 0x71:  # BINPUT
                    memo[byte()] = stack[-1]
                    charge(64)
                elif code == 0x68:  # BINGET
                    stack.append(memo[byte()])
                elif code == 0x28:  # MARK
                    marks.append(len(stack))
                elif code == 0x58:  # BINUNICODE
                    (n,) = struct.unpack("<I", take(4))
                    charge(n)
                    stack.append(str(take(n), "utf-8", "surrogatepass"))
                elif code == 0x8c:  # SHORT_BINUNICODE
                    n = byte()
                    charge(49 + n)
                    stack.append(str(take(n), "utf-8", "surrogatepass"))
                elif code == 0x4b:  # BININT1
                    stack.append(byte())
                elif code == 0x4d:  # BININT2
                    stack.append(int.from_bytes(take(2), "little"))
                elif code == 0x4a:  # BININT
                    stack.append(struct.unpack("<i", take(4))[0])
                elif code == 0x94:  # MEMOIZE
                    memo[len(memo)] = stack[-1]
                    charge(64)
                elif code == 0x74:  # TUPLE
                    items = pop_mark()
                    charge(40 + 8 * len(items))
                    stack.append(tuple(items))
                elif code == 0x29:  # EMPTY_TUPLE
                    stack.append(())
                elif code in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                    n = code - 0x84
                    if len(stack) < n:
                        raise IndexError
                    stack[-n:] = [tuple(stack[-n:])]
                    charge(40 + 8 * n)
                elif code == 0x52:  # REDUCE
                    args = stack.pop()
                    stack[-1] = self._apply(stack[-1], args)
                    charge(400)
                elif code == 0x51:  # BINPERSID
                    stack[-1] = self._persistent(stack[-1])
                    charge(300)
                elif code == 0x7d:  # EMPTY_DICT
                    stack.append({})
                    charge(64)
                elif code == 0x5d:  # EMPTY_LIST
                    stack.append([])
                    charge(56)
                elif code in (0x75, 0x73):  # SETITEMS, SETITEM
                    items = pop_mark() if code == 0x75 else stack[-2:]
                    if code == 0x73:
                        del stack[-2:]
                    if len(items) % 2:
                        raise _Bad("SETITEMS with an odd number of items")
                    target = stack[-1]
                    charge(48 * len(items))
                    if isinstance(target, dict):
                        for j in range(0, len(items), 2):
                            target[self._key(items[j], "a dict")] = items[j + 1]
                    elif isinstance(target, Opaque):
                        self._method(target, "__setitem__")
                        for j in range(0, len(items), 2):
                            target.__dict__["_ws_items"][self._key(items[j], "an object")] = items[j + 1]
                    else:
                        raise _Bad(f"SETITEMS on a {_short(target)}")
                elif code in (0x65, 0x61):  # APPENDS, APPEND
                    items = pop_mark() if code == 0x65 else [stack.pop()]
                    target = stack[-1]
                    charge(8 * len(items))
                    if isinstance(target, list):
                        target.extend(items)
                    elif isinstance(target, Opaque):
                        self._method(target, "extend/append")
                        target.__dict__["_ws_list"].extend(items)
                    else:
                        raise _Bad(f"APPENDS on a {_short(target)}")
                elif code == 0x88:  # NEWTRUE
                    stack.append(True)
                elif code == 0x89:  # NEWFALSE
                    stack.append(False)
                elif code == 0x4e:  # NONE
                    stack.append(None)
                elif code == 0x47:  # BINFLOAT
                    stack.append(struct.unpack(">d", take(8))[0])
                elif code == 0x63:  # GLOBAL
                    module = self._line().decode("utf-8")
                    name = self._line().decode("utf-8")
                    stack.append(self._global(module, name))
                elif code == 0x93:  # STACK_GLOBAL
                    name = stack.pop()
                    module = stack.pop()
                    if type(module) is not str or type(name) is not str:
                        raise _Bad("STACK_GLOBAL names a global with something other than strings")
                    stack.append(self._global(module, name))
                elif code == 0x81:  # NEWOBJ
                    args = stack.pop()
                    if not isinstance(args, tuple):
                        raise _Bad("NEWOBJ with arguments that are no tuple")
                    stack[-1] = self._new(stack[-1], args, None)
                    charge(400)
                elif code == 0x92:  # NEWOBJ_EX
                    kwargs = stack.pop()
                    args = stack.pop()
                    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                        raise _Bad("NEWOBJ_EX with malformed arguments")
                    stack[-1] = self._new(stack[-1], args, kwargs)
                    charge(400)
                elif code == 0x62:  # BUILD
                    state = stack.pop()
                    self._build(stack[-1], state)
                elif code == 0x30:  # POP
                    if marks and marks[-1] == len(stack):
                        marks.pop()
                    else:
                        stack.pop()
                elif code == 0x31:  # POP_MARK
                    pop_mark()
                elif code == 0x32:  # DUP
                    stack.append(stack[-1])
                elif code == 0x2e:  # STOP
                    if len(stack) != 1 or marks:
                        raise _Bad("STOP with a stack that does not hold exactly one object")
                    self.stream.seek(self.base + self.i)
                    return stack[0]
                elif code == 0x80:  # PROTO
                    if byte() > pickle.HIGHEST_PROTOCOL:
                        raise _Bad("unsupported pickle protocol")
                elif code == 0x95:  # FRAME: a length hint only
                    take(8)
                elif code == 0x72:  # LONG_BINPUT
                    (n,) = struct.unpack("<I", take(4))
                    memo[n] = stack[-1]
                    charge(64)
                elif code == 0x6a:  # LONG_BINGET
                    (n,) = struct.unpack("<I", take(4))
                    stack.append(memo[n])
                elif code == 0x70:  # PUT
                    memo[int(self._line())] = stack[-1]
                    charge(64)
                elif code == 0x67:  # GET
                    stack.append(memo[int(self._line())])
                elif code == 0x6c:  # LIST
                    items = pop_mark()
                    charge(56 + 8 * len(items))
                    stack.append(items)
                elif code == 0x64:  # DICT
                    items = pop_mark()
                    if len(items) % 2:
                        raise _Bad("DICT with an odd number of items")
                    charge(48 * len(items))
                    stack.append({self._key(items[j], "a dict"): items[j + 1] for j in range(0, len(items), 2)})
                elif code == 0x8f:  # EMPTY_SET
                    stack.append(set())
                    charge(200)
                elif code in (0x90, 0x91):  # ADDITEMS, FROZENSET
                    items = pop_mark()
                    charge(48 * len(items))
                    members = [self._key(x, "a set") for x in items]
                    if code == 0x91:
                        stack.append(frozenset(members))
                    elif isinstance(stack[-1], set):
                        stack[-1].update(members)
                    elif isinstance(stack[-1], Opaque):
                        self._method(stack[-1], "add")
                    else:
                        raise _Bad(f"ADDITEMS on a {_short(stack[-1])}")
                elif code == 0x69:  # INST
                    module = self._line().decode("utf-8")
                    name = self._line().decode("utf-8")
                    stack.append(self._apply(self._global(module, name), tuple(pop_mark())))
                elif code == 0x6f:  # OBJ
                    items = pop_mark()
                    if not items:
                        raise _Bad("OBJ without a class")
                    stack.append(self._apply(items[0], tuple(items[1:])))
                elif code in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4
                    width = {0x82: 1, 0x83: 2, 0x84: 4}[code]
                    ext = int.from_bytes(take(width), "little")
                    stack.append(self._call(_instance(self._placeholder(f"copyreg extension {ext}")),
                                            "a global from the extension registry, not named in the file"))
                elif code == 0x8a:  # LONG1
                    n = byte()
                    stack.append(int.from_bytes(take(n), "little", signed=True))
                elif code == 0x8b:  # LONG4
                    (n,) = struct.unpack("<i", take(4))
                    if not 0 <= n <= 1 << 16:
                        raise _Bad(f"an integer of {n:,} bytes")
                    stack.append(int.from_bytes(take(n), "little", signed=True))
                elif code == 0x49:  # INT
                    text = self._line()
                    stack.append({b"00": False, b"01": True}.get(text) if text in (b"00", b"01") else int(text))
                elif code == 0x4c:  # LONG
                    stack.append(int(self._line().rstrip(b"L")))
                elif code == 0x46:  # FLOAT
                    stack.append(float(self._line()))
                elif code in (0x42, 0x8e, 0x43):  # BINBYTES, BINBYTES8, SHORT_BINBYTES
                    width = {0x42: 4, 0x8e: 8, 0x43: 1}[code]
                    n = int.from_bytes(take(width), "little")
                    charge(n)
                    stack.append(take(n))
                elif code == 0x96:  # BYTEARRAY8
                    (n,) = struct.unpack("<Q", take(8))
                    charge(n)
                    stack.append(bytearray(take(n)))
                elif code == 0x8d:  # BINUNICODE8
                    (n,) = struct.unpack("<Q", take(8))
                    charge(n)
                    stack.append(str(take(n), "utf-8", "surrogatepass"))
                elif code == 0x56:  # UNICODE
                    stack.append(str(self._line(), "raw-unicode-escape"))
                elif code in (0x54, 0x55):  # BINSTRING, SHORT_BINSTRING (Python 2 str)
                    n = struct.unpack("<i", take(4))[0] if code == 0x54 else byte()
                    if n < 0:
                        raise _Bad("BINSTRING with a negative length")
                    charge(max(n, 0))
                    stack.append(_py2_str(take(n)))
                elif code == 0x53:  # STRING
                    text = self._line()
                    if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b"'", b"\""):
                        raise _Bad("STRING opcode argument is not quoted")
                    stack.append(_py2_str(codecs.escape_decode(text[1:-1])[0]))
                elif code == 0x50:  # PERSID
                    stack.append(self._persistent(self._line().decode("ascii")))
                else:  # NEXT_BUFFER, READONLY_BUFFER (out-of-band data) and unknown opcodes
                    raise _Bad(f"unsupported opcode {self.opname} at byte {self.pos}")
            except IndexError as e:
                raise _Bad(f"{self.opname} at byte {self.pos} finds too few items on the stack") from e
            except KeyError as e:
                raise _Bad(f"{self.opname} at byte {self.pos} fetches a memo entry that was never stored") from e
            except (ValueError, UnicodeDecodeError, OverflowError, struct.error) as e:
                raise _Bad(f"{self.opname} at byte {self.pos}: {e}") from e
            except TypeError as e:  # an allowlisted function given the wrong arguments, an unhashable key
                raise _Bad(f"{self.opname} at byte {self.pos}: {e}") from e


_OPNAMES = {ord(k): v for k, v in {
    "(": "MARK", ".": "STOP", "0": "POP", "1": "POP_MARK", "2": "DUP", "F": "FLOAT", "I": "INT",
    "J": "BININT", "K": "BININT1", "L": "LONG", "M": "BININT2", "N": "NONE", "P": "PERSID", "Q": "BINPERSID",
    "R": "REDUCE", "S": "STRING", "T": "BINSTRING", "U": "SHORT_BINSTRING", "V": "UNICODE", "X": "BINUNICODE",
    "a": "APPEND", "b": "BUILD", "c": "GLOBAL", "d": "DICT", "}": "EMPTY_DICT", "e": "APPENDS", "g": "GET",
    "h": "BINGET", "i": "INST", "j": "LONG_BINGET", "l": "LIST", "]": "EMPTY_LIST", "o": "OBJ", "p": "PUT",
    "q": "BINPUT", "r": "LONG_BINPUT", "s": "SETITEM", "t": "TUPLE", ")": "EMPTY_TUPLE", "u": "SETITEMS",
    "G": "BINFLOAT", "\x80": "PROTO", "\x81": "NEWOBJ", "\x82": "EXT1", "\x83": "EXT2", "\x84": "EXT4",
    "\x85": "TUPLE1", "\x86": "TUPLE2", "\x87": "TUPLE3", "\x88": "NEWTRUE", "\x89": "NEWFALSE",
    "\x8a": "LONG1", "\x8b": "LONG4", "B": "BINBYTES", "C": "SHORT_BINBYTES", "\x8c": "SHORT_BINUNICODE",
    "\x8d": "BINUNICODE8", "\x8e": "BINBYTES8", "\x8f": "EMPTY_SET", "\x90": "ADDITEMS", "\x91": "FROZENSET",
    "\x92": "NEWOBJ_EX", "\x93": "STACK_GLOBAL", "\x94": "MEMOIZE", "\x95": "FRAME", "\x96": "BYTEARRAY8",
    "\x97": "NEXT_BUFFER", "\x98": "READONLY_BUFFER",
}.items()}


def _py2_str(raw: bytes) -> str:
    # torch.load reads Python 2 strings as UTF-8 text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# -- stand-ins for the allowlisted functions ------------------------------------------------------
def _token(module: str, name: str) -> _Token | None:
    if module in ("torch", "torch.storage") and name == "UntypedStorage":
        return _Token("uint8")  # untyped: bytes, viewed as the dtype _rebuild_tensor_v3 names
    if module == "torch" and name in STORAGE_TO_NAME:
        return _Token(STORAGE_TO_NAME[name])
    if module == "torch" and name in _TORCH_DTYPE_NAMES:
        return _Token(name)
    if f"{module}.{name}" in _TENSOR_TYPES:
        return _Token(f"{module}.{name}")
    return None


def _tensor(m: _Machine, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
            hooks: Any, dtype: str, metadata: Any = None) -> TensorRecord:
    if not isinstance(storage, StorageRef):
        raise _Bad(f"a tensor is rebuilt from {_short(storage)}, not a storage")
    if type(offset) is not int or not 0 <= offset < 1 << 62:
        raise _Bad(f"a tensor offset is {_short(offset)}, not a 64-bit integer")
    shape, strides = _dims(size, "shape"), _dims(stride, "stride")
    if len(shape) != len(strides):
        raise _Bad(f"a tensor of shape {list(shape)} has {len(strides)} strides")
    _numel_checked(shape)
    for value, what in ((hooks, "backward hooks"), (metadata, "metadata")):
        # torch tests the hooks for truth and hands metadata to C++: plain values only
        if not isinstance(value, (dict, type(None))) or not _is_data(value):
            m._call(value, f"a tensor's {what} are a {m._name(value)}, which torch would test or read")
    m._charge(400)
    return TensorRecord(storage, offset, shape, strides, dtype, _flag(requires_grad, "a tensor's requires_grad"))


def _rebuild_tensor_v2(m: _Machine, storage: Any = None, offset: Any = 0, size: Any = (), stride: Any = (),
                       requires_grad: Any = False, hooks: Any = None, metadata: Any = None, *rest: Any
                       ) -> TensorRecord:
    if rest:
        raise _Bad("_rebuild_tensor_v2 with too many arguments")
    dtype = storage.dtype if isinstance(storage, StorageRef) else "?"
    return _tensor(m, storage, offset, size, stride, requires_grad, hooks, dtype, metadata)


def _rebuild_tensor_v3(m: _Machine, storage: Any = None, offset: Any = 0, size: Any = (), stride: Any = (),
                       requires_grad: Any = False, hooks: Any = None, dtype: Any = None, metadata: Any = None,
                       *rest: Any) -> TensorRecord:
    """``torch._utils._rebuild_tensor_v3``: an untyped (byte) storage viewed as ``dtype``."""
    if rest:
        raise _Bad("_rebuild_tensor_v3 with too many arguments")
    if not isinstance(dtype, _Token) or _DTYPE_ALIASES.get(dtype, dtype) not in BITS:
        raise _Bad(f"_rebuild_tensor_v3 names the dtype {_short(dtype)}")
    return _tensor(m, storage, offset, size, stride, requires_grad, hooks, _DTYPE_ALIASES.get(dtype, dtype),
                   metadata)


def _rebuild_tensor(m: _Machine, storage: Any = None, offset: Any = 0, size: Any = (), stride: Any = ()
                    ) -> TensorRecord:
    return _rebuild_tensor_v2(m, storage, offset, size, stride)


def _rebuild_parameter(m: _Machine, data: Any = None, requires_grad: Any = True, hooks: Any = None,
                       state: Any = None) -> Any:
    if not isinstance(data, TensorRecord):
        raise _Bad(f"a parameter is rebuilt from {_short(data)}, not a tensor")
    if not isinstance(hooks, (dict, type(None))) or not _is_data(hooks):
        m._call(hooks, "a parameter's hooks are no plain data")
    if not _plain_state(state):
        m._call(state if not _is_data(state) else m._placeholder("torch._utils._set_obj_state"),
                "a parameter's state sets attributes that are not plain names and values")
    data.requires_grad = _flag(requires_grad, "a parameter's requires_grad")
    data.is_parameter = True
    return data


def _rebuild_meta(m: _Machine, dtype: Any = None, size: Any = (), stride: Any = (), requires_grad: Any = False,
                  *_rest: Any) -> TensorRecord:
    if not isinstance(dtype, _Token) or _DTYPE_ALIASES.get(dtype, dtype) not in BITS:
        raise _Bad(f"a meta tensor names the dtype {_short(dtype)}")
    shape = _dims(size, "shape")
    _numel_checked(shape)
    return TensorRecord(None, 0, shape, _dims(stride, "stride"), _DTYPE_ALIASES.get(dtype, dtype),
                        _flag(requires_grad, "a meta tensor's requires_grad"))


def _rebuild_from_type_v2(m: _Machine, func: Any = None, new_type: Any = None, args: Any = (),
                          state: Any = None) -> Any:
    # torch calls func(*args), then as_subclass(new_type) and new_type's __setstate__
    if not isinstance(new_type, _Token) or new_type not in _TENSOR_TYPES:
        m._call(new_type, "a tensor subclass: its __setstate__ and as_subclass run")
    if not _plain_state(state):
        m._call(state if not _is_data(state) else m._placeholder("torch._utils._set_obj_state"),
                "a tensor's state sets attributes that are not plain names and values")
    if not isinstance(args, tuple):
        raise _Bad("_rebuild_from_type_v2 with arguments that are no tuple")
    return m._apply(func, args)


class _AttrDict(dict):  # type: ignore[type-arg]
    """A plain dict that also takes attributes: ``state_dict()`` pickles its ``_metadata`` as one."""


def _ordered_dict(m: _Machine, *args: Any) -> Any:
    out = _AttrDict()
    if len(args) > 1:
        raise _Bad("OrderedDict with more than one argument")
    if args:
        items = args[0]
        if isinstance(items, dict):
            for k in items:
                m._key(k, "an OrderedDict")
            out.update(items)
        elif isinstance(items, (list, tuple)):
            for pair in items:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    return m._call(pair if not _is_data(pair) else m._placeholder("collections.OrderedDict"),
                                   "OrderedDict unpacks an item that is no pair", (pair,))
                out[m._key(pair[0], "an OrderedDict")] = pair[1]
        else:
            return m._call(items if not _is_data(items) else m._placeholder("collections.OrderedDict"),
                           "OrderedDict iterates it", (items,))
    return out


def _size(m: _Machine, *args: Any) -> tuple[int, ...]:
    if not args:
        return ()
    return _dims(args[0], "size")


def _encode(m: _Machine, text: Any = "", encoding: Any = "utf-8", *rest: Any) -> bytes:
    if rest or type(text) is not str or type(encoding) is not str:
        raise _Bad("_codecs.encode with arguments other than text and a codec name")
    if encoding.lower().replace("-", "").replace("_", "") not in {"latin1", "utf8", "ascii"}:
        raise _Bad(f"refusing codec {encoding[:40]!r}")
    m._charge(len(text))
    return text.encode(encoding)


def _bytearray(m: _Machine, *args: Any) -> bytearray:
    # pickles rebuild a bytearray from its bytes; bytearray(<int>) would let a few bytes of
    # file allocate and zero-fill any amount of memory
    if args and not isinstance(args[0], (bytes, str)):
        raise _Bad(f"refusing bytearray({type(args[0]).__name__})")
    if args and isinstance(args[0], str) and (len(args) < 2 or not isinstance(args[1], str)):
        raise _Bad("bytearray of text without a codec")
    m._charge(len(args[0]) if args else 0)
    return bytearray(*args[:2]) if args else bytearray()


def _set_of(kind: type) -> Callable[..., Any]:
    def build(m: _Machine, *args: Any) -> Any:
        if not args:
            return kind()
        items = args[0]
        if len(args) > 1 or not isinstance(items, (list, tuple, set, frozenset)):
            return m._call(items if not _is_data(items) else m._placeholder(f"builtins.{kind.__name__}"),
                           f"{kind.__name__} iterates it", (items,))
        return kind(m._key(x, f"a {kind.__name__}") for x in items)
    return build


def _plain_args(kind: Callable[..., Any], *types_: type) -> Callable[..., Any]:
    def build(m: _Machine, *args: Any) -> Any:
        if len(args) > 3 or not all(isinstance(a, types_) for a in args):
            raise _Bad(f"{getattr(kind, '__name__', kind)} with arguments {', '.join(_short(a) for a in args)}")
        return kind(*args)
    return build


def _path(sep: str) -> Callable[..., Any]:
    def build(m: _Machine, *args: Any) -> _Token:
        if not all(isinstance(a, str) for a in args):
            raise _Bad("a path built from something other than strings")
        return _Token(sep.join(args))
    return build


def _token_of(m: _Machine, *args: Any) -> _Token:
    if not all(isinstance(a, (str, int)) for a in args):
        raise _Bad("a device or layout named by something other than strings and integers")
    return _Token(":".join(str(a) for a in args))


_FUNC_TABLE: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "torch.Size": _size,
    "torch.device": _token_of,
    "torch.serialization._get_layout": _token_of,
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING":
        lambda m, v=0: _Token(f"mem_format_{v}") if type(v) is int else _token_of(m, None),
    "_codecs.encode": _encode,
    "pathlib.PosixPath": _path("/"),
    "pathlib.PurePosixPath": _path("/"),
    "pathlib.WindowsPath": _path("\\"),
    "pathlib.PureWindowsPath": _path("\\"),
    "copyreg._reconstructor": lambda m, *a: m._reconstruct(*a[:3]) if len(a) <= 3 else _token_of(m, None),
    "copyreg.__newobj__": lambda m, cls=None, *a: m._new(cls, a, None),
    "copyreg.__newobj_ex__": lambda m, cls=None, a=(), kw=None, *_: m._new(
        cls, a if isinstance(a, tuple) else (a,), kw),
    "builtins.set": _set_of(set),
    "builtins.frozenset": _set_of(frozenset),
    "builtins.slice": _plain_args(slice, int, type(None)),
    "builtins.complex": _plain_args(complex, int, float),
    "builtins.bytearray": _bytearray,
}
_NEWOBJ_OK = {"collections.OrderedDict", "builtins.set", "builtins.frozenset"}
_FUNCS: dict[str, _Func] = {name: _Func(name, fn, name in _NEWOBJ_OK) for name, fn in _FUNC_TABLE.items()}
# the stand-ins by name, for tests that check no pickle can change them
_TORCH_FUNCS = _FUNC_TABLE


def is_allowed(module: str, name: str) -> bool:
    """Whether ``module.name`` is on the allowlist of globals a checkpoint may use."""
    return f"{module}.{name}" in _FUNCS or _token(module, name) is not None


# -- entry points ---------------------------------------------------------------------------------
def budget_for(nbytes: int) -> int:
    """Bytes of objects a pickle of ``nbytes`` may build: twice its size plus a fixed allowance."""
    return 2 * nbytes + _BASE_BUDGET


def scan_pickle(data: bytes, *, legacy: bool = False, budget: int | None = None) -> PickleScan:
    """Walk one pickle; ``scan.objects[0]`` is the object tree with stand-ins."""
    return scan_pickles(io.BytesIO(data), count=1, legacy=legacy,
                        budget=budget_for(len(data)) if budget is None else budget)


def scan_pickles(stream: Any, *, count: int | None = None, legacy: bool = False,
                 budget: int | None = None) -> PickleScan:
    """Walk ``count`` consecutive pickles from a binary stream (all of them when ``None``).

    The stream is left just after the last pickle read. ``budget`` caps the bytes of objects
    all of them together may build (default: from the stream's remaining size).

    Raises:
        pickle.UnpicklingError: malformed, truncated, or past the budget; ``error.scan`` holds
            what was read before the break (a real unpickler would already have run its calls).
    """
    scan = PickleScan()
    if budget is None:
        here = stream.tell()
        size = stream.seek(0, io.SEEK_END) - here
        stream.seek(here)
        budget = budget_for(size)
    placeholders: dict[str, type] = {}
    while count is None or len(scan.objects) < count:
        if count is None:
            if not stream.read(1):
                break
            stream.seek(-1, io.SEEK_CUR)
        machine = _Machine(stream, scan, legacy, budget, placeholders)
        try:
            scan.objects.append(machine.run())
        except EOFError:
            raise _failed("the pickle stream ends early (truncated?)", scan) from None
        except pickle.UnpicklingError as e:
            raise _failed(str(e), scan) from e
        except (MemoryError, RecursionError) as e:
            raise _failed(f"{type(e).__name__} while reading the pickle", scan) from e
        budget = machine.budget
    return scan


def _failed(message: str, scan: PickleScan) -> pickle.UnpicklingError:
    """The error for an unreadable pickle, carrying what was read before it (``.scan``).

    A real unpickler runs each call as it reaches it, so a pickle that calls code and is then
    malformed is as unsafe as a well-formed one; callers check ``error.scan.called``.
    """
    error = pickle.UnpicklingError(message)
    error.scan = scan  # type: ignore[attr-defined]
    return error
