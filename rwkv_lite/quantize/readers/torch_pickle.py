"""The restricted pickle machine that reads a torch state dict's data.pkl without executing anything from it.

torch.save pickles (protocol 2) the state dict with each tensor as
    _rebuild_tensor_v2(<persistent id ('storage', torch.FloatStorage, key, 'cpu', numel)>,
                       storage_offset, size, stride, requires_grad, backward_hooks)
``RestrictedUnpickler`` knows the few globals a state dict needs and maps each to a marker of our own; the tensor
rebuilders become ``TensorSpec`` records (a view into a ``Storage``). Nothing named in the file is ever imported
or called; any other global, and opcodes that build arbitrary objects (INST, OBJ, NEWOBJ, EXT*), are refused with
UnsafeCheckpointError. The zip container around data.pkl is read by torch_zip.py.
"""
from __future__ import annotations

import struct

from ...errors import FormatError, UnsafeCheckpointError

# torch storage classes (typed storages, as torch.save still writes them) -> our dtype names
_STORAGE_TYPES = {
    "FloatStorage": "f32", "HalfStorage": "f16", "BFloat16Storage": "bf16", "DoubleStorage": "f64",
    "LongStorage": "i64", "IntStorage": "i32", "ShortStorage": "i16", "CharStorage": "i8",
    "ByteStorage": "u8", "BoolStorage": "bool", "UntypedStorage": "u8",
}
# torch dtype objects (pickled as GLOBAL 'torch float32'), used by _rebuild_tensor_v3
_TORCH_DTYPES = {
    "float32": "f32", "float": "f32", "float16": "f16", "half": "f16", "bfloat16": "bf16", "float64": "f64",
    "double": "f64", "int64": "i64", "long": "i64", "int32": "i32", "int": "i32", "int16": "i16", "short": "i16",
    "int8": "i8", "uint8": "u8", "bool": "bool", "uint16": "u16", "uint32": "u32", "uint64": "u64",
}


class _Global:
    """An allowed global: a name the pickle may mention, standing for our own handler (never the real thing)."""
    __slots__ = ("qualname", "role", "dtype")

    def __init__(self, qualname: str, role: str, dtype: str | None = None):
        self.qualname, self.role, self.dtype = qualname, role, dtype


def _allowed_globals() -> dict[tuple[str, str], _Global]:
    table = {}

    def add(module, name, role, dtype=None):
        table[module, name] = _Global(f"{module}.{name}", role, dtype)

    add("collections", "OrderedDict", "ordered_dict")
    add("torch._utils", "_rebuild_tensor", "rebuild_v1")
    add("torch._utils", "_rebuild_tensor_v2", "rebuild_v2")
    add("torch._utils", "_rebuild_tensor_v3", "rebuild_v3")
    add("torch._utils", "_rebuild_parameter", "rebuild_parameter")
    add("torch._utils", "_rebuild_parameter_with_state", "rebuild_parameter_with_state")
    add("torch._tensor", "_rebuild_from_type_v2", "rebuild_from_type_v2")
    add("torch", "Tensor", "tensor_type")
    add("torch.nn.parameter", "Parameter", "tensor_type")
    for name, dtype in _STORAGE_TYPES.items():
        add("torch", name, "storage_type", dtype)
    for name, dtype in _TORCH_DTYPES.items():
        add("torch", name, "dtype", dtype)
    return table


_ALLOWED = _allowed_globals()


class _ODict(dict):
    """What `collections.OrderedDict()` builds here: a plain dict we can tell apart (BUILD is allowed on it)."""


class Storage:
    """One storage record data/<key>: where its bytes are and their element type."""
    __slots__ = ("key", "dtype", "nbytes", "file", "offset")

    def __init__(self, key, dtype, nbytes, file, offset):
        self.key, self.dtype, self.nbytes, self.file, self.offset = key, dtype, nbytes, file, offset


class TensorSpec:
    """A tensor as data.pkl describes it: a view (offset, size, stride in elements) into a storage."""
    __slots__ = ("storage", "dtype", "offset", "size", "stride")

    def __init__(self, storage, dtype, offset, size, stride):
        self.storage, self.dtype, self.offset, self.size, self.stride = storage, dtype, offset, size, stride


_PRIMITIVE_KEYS = (str, int, float, bytes, bool, type(None))


class RestrictedUnpickler:
    """A pickle machine for torch state dicts that executes nothing from the file.

    It implements the opcodes torch.save emits (protocol 2, plus the harmless protocol 3-5 ones). GLOBAL and
    STACK_GLOBAL resolve only names in the allowlist, to markers; REDUCE applies only those markers, to our
    handlers; BUILD is allowed only on an OrderedDict (torch stores `_metadata` there; the state is dropped).
    `persistent_load(pid)` turns a ('storage', ...) persistent id into a `Storage` (checked by storage_id). Dict
    keys must be plain scalars (hashing attacker-shaped nested tuples can overflow the C stack)."""

    def __init__(self, data: bytes, where: str, persistent_load):
        self.data = data
        self.where = where                     # "<file>: data.pkl", for messages
        self.persistent_load = persistent_load

    # --- refusal helpers ---
    def _unsafe(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self.where} {what}; refused (nothing was executed; only tensor-rebuild "
                                     f"records are allowed)")

    def _bad(self, what: str) -> FormatError:
        return FormatError(f"{self.where} is not a valid checkpoint pickle ({what})")

    def load(self):
        try:
            return self._run()
        except FormatError:
            raise
        except (IndexError, KeyError, TypeError, ValueError, struct.error, UnicodeDecodeError,
                OverflowError, AttributeError) as e:
            raise self._bad(f"{e.__class__.__name__}: {str(e)[:100]}") from None

    def _read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self._bad("truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def _readline(self) -> bytes:
        end = self.data.find(b"\n", self.pos, self.pos + 4096)
        if end < 0:
            raise self._bad("unterminated text field")
        line = self.data[self.pos:end]
        self.pos = end + 1
        return line

    def _find_global(self, module: str, name: str) -> _Global:
        marker = _ALLOWED.get((module, name))
        if marker is None:
            raise self._unsafe(f"asks for the global {module}.{name}")
        return marker

    def _pop_mark(self) -> list:
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _run(self):
        self.pos = 0
        self.stack: list = []
        self.metastack: list = []
        memo: dict = {}
        u8, u16, i32, u32, u64 = (struct.Struct(f) for f in ("<B", "<H", "<i", "<I", "<Q"))
        while True:
            op = self._read(1)[0]
            stack = self.stack
            # --- framing and protocol ---
            if op == 0x80:                                       # PROTO
                if self._read(1)[0] > 5:
                    raise self._bad("unknown pickle protocol")
            elif op == 0x95:                                     # FRAME (protocol 4): length prefix only
                self._read(8)
            elif op == 0x2E:                                     # STOP
                if len(stack) != 1 or self.metastack:
                    raise self._bad("stack not balanced at STOP")
                return stack[0]
            # --- stack manipulation ---
            elif op == 0x28:                                     # MARK
                self.metastack.append(stack)
                self.stack = []
            elif op == 0x30:                                     # POP
                if stack:
                    stack.pop()
                else:
                    self._pop_mark()
            elif op == 0x31:                                     # POP_MARK
                self._pop_mark()
            elif op == 0x32:                                     # DUP
                stack.append(stack[-1])
            # --- scalars ---
            elif op == 0x4E:                                     # NONE
                stack.append(None)
            elif op == 0x88:                                     # NEWTRUE
                stack.append(True)
            elif op == 0x89:                                     # NEWFALSE
                stack.append(False)
            elif op == 0x4A:                                     # BININT
                stack.append(i32.unpack(self._read(4))[0])
            elif op == 0x4B:                                     # BININT1
                stack.append(self._read(1)[0])
            elif op == 0x4D:                                     # BININT2
                stack.append(u16.unpack(self._read(2))[0])
            elif op == 0x8A:                                     # LONG1
                n = self._read(1)[0]
                stack.append(int.from_bytes(self._read(n), "little", signed=True))
            elif op == 0x8B:                                     # LONG4
                n = i32.unpack(self._read(4))[0]
                if n > 64:
                    raise self._bad("integer of absurd length")
                stack.append(int.from_bytes(self._read(n), "little", signed=True))
            elif op == 0x49:                                     # INT (text)
                line = self._readline()
                stack.append(False if line == b"00" else True if line == b"01" else int(line))
            elif op == 0x4C:                                     # LONG (text)
                stack.append(int(self._readline().rstrip(b"L")))
            elif op == 0x47:                                     # BINFLOAT
                stack.append(struct.unpack(">d", self._read(8))[0])
            elif op == 0x46:                                     # FLOAT (text)
                stack.append(float(self._readline()))
            elif op == 0x58:                                     # BINUNICODE
                stack.append(self._read(u32.unpack(self._read(4))[0]).decode("utf-8", "surrogatepass"))
            elif op == 0x8C:                                     # SHORT_BINUNICODE
                stack.append(self._read(self._read(1)[0]).decode("utf-8", "surrogatepass"))
            elif op == 0x8D:                                     # BINUNICODE8
                stack.append(self._read(u64.unpack(self._read(8))[0]).decode("utf-8", "surrogatepass"))
            elif op == 0x56:                                     # UNICODE (text)
                stack.append(self._readline().decode("raw_unicode_escape"))
            elif op == 0x55:                                     # SHORT_BINSTRING (py2 str -> ascii)
                stack.append(self._read(self._read(1)[0]).decode("ascii"))
            elif op == 0x54:                                     # BINSTRING
                stack.append(self._read(i32.unpack(self._read(4))[0]).decode("ascii"))
            elif op == 0x43:                                     # SHORT_BINBYTES
                stack.append(self._read(self._read(1)[0]))
            elif op == 0x42:                                     # BINBYTES
                stack.append(self._read(u32.unpack(self._read(4))[0]))
            elif op == 0x8E:                                     # BINBYTES8
                stack.append(self._read(u64.unpack(self._read(8))[0]))
            # --- containers ---
            elif op == 0x29:                                     # EMPTY_TUPLE
                stack.append(())
            elif op == 0x74:                                     # TUPLE
                items = self._pop_mark()
                self.stack.append(tuple(items))
            elif op in (0x85, 0x86, 0x87):                       # TUPLE1..3
                n = op - 0x84
                if len(stack) < n:
                    raise self._bad("stack underflow")
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif op == 0x5D:                                     # EMPTY_LIST
                stack.append([])
            elif op == 0x6C:                                     # LIST
                items = self._pop_mark()
                self.stack.append(list(items))
            elif op == 0x61:                                     # APPEND
                value = stack.pop()
                self._list_target(stack[-1]).append(value)
            elif op == 0x65:                                     # APPENDS
                items = self._pop_mark()
                self._list_target(self.stack[-1]).extend(items)
            elif op == 0x7D:                                     # EMPTY_DICT
                stack.append({})
            elif op == 0x64:                                     # DICT
                items = self._pop_mark()
                d = {}
                self._set_items(d, items)
                self.stack.append(d)
            elif op == 0x73:                                     # SETITEM
                value = stack.pop()
                key = stack.pop()
                self._set_items(self._dict_target(stack[-1]), [key, value])
            elif op == 0x75:                                     # SETITEMS
                items = self._pop_mark()
                self._set_items(self._dict_target(self.stack[-1]), items)
            # --- memo ---
            elif op == 0x71:                                     # BINPUT
                memo[self._read(1)[0]] = stack[-1]
            elif op == 0x72:                                     # LONG_BINPUT
                memo[u32.unpack(self._read(4))[0]] = stack[-1]
            elif op == 0x94:                                     # MEMOIZE
                memo[len(memo)] = stack[-1]
            elif op == 0x70:                                     # PUT (text)
                memo[int(self._readline())] = stack[-1]
            elif op == 0x68:                                     # BINGET
                stack.append(memo[self._read(1)[0]])
            elif op == 0x6A:                                     # LONG_BINGET
                stack.append(memo[u32.unpack(self._read(4))[0]])
            elif op == 0x67:                                     # GET (text)
                stack.append(memo[int(self._readline())])
            # --- names, calls, persistent ids: only through the allowlist ---
            elif op == 0x63:                                     # GLOBAL
                module = self._readline().decode("utf-8", "replace")
                name = self._readline().decode("utf-8", "replace")
                stack.append(self._find_global(module, name))
            elif op == 0x93:                                     # STACK_GLOBAL
                name = stack.pop()
                module = stack.pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise self._unsafe("uses STACK_GLOBAL with a non-string name")
                stack.append(self._find_global(module, name))
            elif op == 0x52:                                     # REDUCE
                args = stack.pop()
                func = stack[-1]
                stack[-1] = self._call(func, args)
            elif op == 0x62:                                     # BUILD
                state = stack.pop()
                inst = stack[-1]
                if type(inst) is not _ODict:
                    raise self._unsafe(f"applies BUILD (object state) to a {self._describe(inst)}")
                if not isinstance(state, (dict, type(None))):
                    raise self._unsafe("applies BUILD to an OrderedDict with a non-dict state")
                # torch keeps `_metadata` (module versions) here; we have no use for it
            elif op == 0x51:                                     # BINPERSID
                stack.append(self.persistent_load(stack.pop()))
            elif op == 0x69:                                     # INST: module, name, then constructor args
                module = self._readline().decode("utf-8", "replace")
                name = self._readline().decode("utf-8", "replace")
                raise self._unsafe(f"uses the INST opcode to build {module}.{name}")
            elif op in _REFUSED_OPCODES:
                raise self._unsafe(f"uses the {_REFUSED_OPCODES[op]} opcode (builds arbitrary objects)")
            else:
                raise self._bad(f"unsupported pickle opcode 0x{op:02x} at byte {self.pos - 1}")

    @staticmethod
    def _describe(obj) -> str:
        if isinstance(obj, _Global):
            return f"global {obj.qualname}"
        if isinstance(obj, TensorSpec):
            return "tensor"
        return type(obj).__name__

    def _list_target(self, obj) -> list:
        if type(obj) is not list:
            raise self._unsafe(f"appends to a {self._describe(obj)} (only lists allowed)")
        return obj

    def _dict_target(self, obj) -> dict:
        if type(obj) not in (dict, _ODict):
            raise self._unsafe(f"sets items on a {self._describe(obj)} (only dicts allowed)")
        return obj

    def _set_items(self, d: dict, items: list) -> None:
        if len(items) % 2:
            raise self._bad("odd number of items for a dict")
        for i in range(0, len(items), 2):
            key = items[i]
            if not isinstance(key, _PRIMITIVE_KEYS):
                raise self._bad(f"dict key of type {self._describe(key)} (only plain scalars allowed)")
            d[key] = items[i + 1]

    # --- the only "calls": our handlers for allowlisted names ---
    def _call(self, func, args):
        if not isinstance(func, _Global):
            raise self._unsafe(f"calls a {self._describe(func)} (REDUCE on a non-allowed object)")
        if type(args) is not tuple:
            raise self._bad(f"arguments of {func.qualname} are not a tuple")
        role = func.role
        if role == "ordered_dict":
            if args:
                raise self._unsafe("calls collections.OrderedDict with arguments")
            return _ODict()
        if role in ("rebuild_v1", "rebuild_v2", "rebuild_v3"):
            return self._rebuild_tensor(func, args)
        if role in ("rebuild_parameter", "rebuild_parameter_with_state"):
            want = 3 if role == "rebuild_parameter" else 4
            if len(args) != want or not isinstance(args[0], TensorSpec):
                raise self._bad(f"{func.qualname} expects {want} arguments starting with a tensor")
            return args[0]                                   # a Parameter is its data for our purposes
        if role == "rebuild_from_type_v2":                   # (func, new_type, args, state): tensor with a __dict__
            if (len(args) != 4 or not isinstance(args[0], _Global)
                    or args[0].role not in ("rebuild_v1", "rebuild_v2", "rebuild_v3")
                    or not (isinstance(args[1], _Global) and args[1].role == "tensor_type")):
                raise self._unsafe("uses torch._tensor._rebuild_from_type_v2 with something other than a tensor")
            if type(args[2]) is not tuple:
                raise self._bad("bad arguments to _rebuild_from_type_v2")
            return self._rebuild_tensor(args[0], args[2])
        raise self._unsafe(f"calls {func.qualname}, which is not a tensor-rebuild function")

    def _rebuild_tensor(self, func: _Global, args: tuple) -> TensorSpec:
        n = len(args)
        ok_count = {"rebuild_v1": (4,), "rebuild_v2": (6, 7), "rebuild_v3": (7, 8)}[func.role]
        if n not in ok_count:
            raise self._bad(f"{func.qualname} called with {n} arguments")
        storage, offset, size, stride = args[:4]
        if not isinstance(storage, Storage):
            raise self._unsafe(f"passes a {self._describe(storage)} as tensor storage to {func.qualname}")
        if func.role == "rebuild_v3":
            dtype_marker = args[6]
            if not (isinstance(dtype_marker, _Global) and dtype_marker.role == "dtype"):
                raise self._bad("_rebuild_tensor_v3 without a torch dtype")
            dtype = dtype_marker.dtype
        else:
            dtype = storage.dtype
        if not _is_int(offset) or offset < 0:
            raise self._bad("negative or non-integer storage offset")
        for dims in (size, stride):
            if type(dims) is not tuple or not all(_is_int(d) and d >= 0 for d in dims):
                raise self._bad("tensor size/stride must be tuples of non-negative integers")
        if len(size) != len(stride) or len(size) > 8:
            raise self._bad("tensor size and stride differ in length (or > 8 dims)")
        return TensorSpec(storage, dtype, offset, size, stride)


def _is_int(x) -> bool:
    return type(x) is int


_REFUSED_OPCODES = {0x6F: "OBJ", 0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
                    0x50: "PERSID", 0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER"}


def storage_id(pid, where: str) -> tuple[str, str, int]:
    """(key, dtype name, element count) of a ('storage', <storage type>, key, location, numel) persistent id, the
    only kind a state dict holds; anything else is refused (UnsafeCheckpointError) or malformed (FormatError).
    `where` names the file for messages."""
    if (type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage"
            or not (isinstance(pid[1], _Global) and pid[1].role == "storage_type")):
        raise UnsafeCheckpointError(f"{where}: data.pkl has a persistent id that is not a tensor storage "
                                    f"record; refused (nothing was executed)")
    _, stype, key, location, numel = pid
    if type(key) is not str or type(location) is not str or not _is_int(numel) or numel < 0:
        raise FormatError(f"{where}: data.pkl has a malformed storage record")
    return key, stype.dtype, numel
