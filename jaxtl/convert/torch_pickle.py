"""Read ``torch.save`` state dicts into NumPy arrays without importing torch and without running code.

A ``.pth`` file is a pickle, and unpickling can call any importable function. This reader is a
restricted unpickler (the same idea as ``torch.load(weights_only=True)``): the only globals it
resolves are the handful a tensor state dict needs (``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and friends, ``torch.FloatStorage``-style storage types), each
replaced by a local NumPy implementation, so torch itself is never imported. Any other global
(``os.system``, ``builtins.eval``, a pickled ``nn.Module`` class, ...) stops the load with
:class:`UnsafePickleError` *before* anything is called.

Two container formats are read:

* zip (``torch.save`` default since 1.6): ``<archive>/data.pkl`` plus one raw little-endian
  storage per ``<archive>/data/<key>`` entry;
* legacy (``_use_new_zipfile_serialization=False``): magic number, protocol, sys-info pickles,
  the object pickle, the list of storage keys, then each storage as ``int64 numel`` + raw bytes.

Tensors are rebuilt from ``(storage, offset, size, stride)`` with bounds checks and returned as
contiguous NumPy copies.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# torch storage class name -> element dtype (little endian unless the file says otherwise).
STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The file asks the unpickler for something a plain state dict never contains (also a ``ValueError``, so
    callers that report bad user input, like the CLI, print its message instead of a traceback)."""


class TorchFileError(ValueError):
    """The file is not a readable ``torch.save`` state dict (truncated, wrong layout, ...)."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # 1-D, filled when the bytes are read
    view_of: tuple[str, int] | None = None  # legacy storage views: (root key, element offset)


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _check_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise TorchFileError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from a non-storage object {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise TorchFileError(f"tensor storage offset must be a non-negative int, got {storage_offset!r}")
    size = _check_int_tuple(size, "size")
    stride = _check_int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise TorchFileError(f"tensor size {size} and stride {stride} differ in length")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
    backward_hooks: Any = None, metadata: Any = None,
) -> _TensorRef:
    del requires_grad, backward_hooks, metadata  # autograd bookkeeping, irrelevant to the values
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    if not isinstance(data, _TensorRef):
        raise UnsafePickleError("nn.Parameter rebuilt from something that is not a tensor")
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
    return _rebuild_parameter(data)


# (module, name) -> local replacement. Everything else is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler with an allow-list of globals and a restricted BUILD opcode.

    The pure-Python ``pickle._Unpickler`` is used (not the C one) because only it lets us replace
    the BUILD handler: a state dict uses BUILD solely to attach ``_metadata`` to its OrderedDict,
    and BUILD on any other object could rewrite attributes of our tensor placeholders.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, source: str, storages: dict[str, _Storage], legacy: bool) -> None:
        super().__init__(file)
        self._source = source
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle the global '{module}.{name}'. A PyTorch state dict "
                "only needs tensors, storages and OrderedDict; this file contains other Python objects "
                "(a whole pickled model, an optimizer, or code crafted to run on load), and jaxtl never "
                "executes pickled code. Re-save only the weights, e.g. torch.save(model.state_dict(), path), "
                "or better convert them to safetensors."
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafePickleError(f"{self._source}: unsupported persistent id {str(pid)[:80]!r}")
        if self._legacy:
            if len(pid) != 6:
                raise TorchFileError(f"{self._source}: malformed legacy storage id {pid!r}")
            _, stype, key, _location, numel, view = pid
        else:
            if len(pid) != 5:
                raise TorchFileError(f"{self._source}: malformed storage id {pid!r}")
            _, stype, key, _location, numel = pid
            view = None
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise UnsafePickleError(f"{self._source}: malformed storage id {str(pid)[:120]!r}")
        root = self._storages.get(key)
        if root is None:
            root = self._storages[key] = _Storage(key, stype.dtype, numel)
        elif root.dtype != stype.dtype:
            raise TorchFileError(f"{self._source}: storage {key} is used with two dtypes")
        if view is None:
            return root
        # Legacy storage views: (view_key, element offset, element count) into the root storage.
        if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])):
            raise TorchFileError(f"{self._source}: malformed storage view {view!r}")
        view_key, offset, view_numel = view
        return _Storage(str(view_key), stype.dtype, view_numel, view_of=(key, offset))

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, collections.OrderedDict) or not isinstance(state, dict):
            raise UnsafePickleError(
                f"{self._source}: refusing to set the state of a {type(inst).__name__} object while unpickling"
            )
        # The only legitimate use: OrderedDict._metadata (per-module version numbers). Not needed.

    dispatch[pickle.BUILD[0]] = _load_build


def _resolve(obj: Any, source: str, byteorder: str) -> Any:
    """Replace every ``_TensorRef`` in a nested container by a contiguous NumPy array."""
    if isinstance(obj, _TensorRef):
        return _materialise(obj, source, byteorder)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, source, byteorder)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(v, source, byteorder) for v in obj)
    return obj


def _materialise(t: _TensorRef, source: str, byteorder: str) -> np.ndarray:
    st = t.storage
    if st.data is None:
        raise TorchFileError(f"{source}: the bytes of storage {st.key} are missing from the file")
    flat = st.data
    if any(s == 0 for s in t.size):
        return np.zeros(t.size, dtype=flat.dtype.newbyteorder("="))
    last = t.offset + sum((s - 1) * d for s, d in zip(t.size, t.stride, strict=True))
    if last >= flat.size:
        raise TorchFileError(
            f"{source}: a tensor of size {t.size} stride {t.stride} offset {t.offset} reads past the end of "
            f"storage {st.key} ({flat.size} elements)"
        )
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset:], shape=t.size, strides=tuple(d * item for d in t.stride), writeable=False
    )
    # np.array (not ascontiguousarray, which turns 0-d scalars into 1-d) copies into native byte order.
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")


def _storage_array(raw: bytes, st: _Storage, source: str, byteorder: str) -> np.ndarray:
    dtype = st.dtype.newbyteorder("<" if byteorder == "little" else ">")
    need = st.numel * dtype.itemsize
    if len(raw) < need:
        raise TorchFileError(f"{source}: storage {st.key} has {len(raw)} bytes, expected {need} (truncated file?)")
    return np.frombuffer(raw, dtype=dtype, count=st.numel)


def _load_zip(path: Path) -> Any:
    source = str(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise TorchFileError(f"{source}: a zip file but not a torch.save archive (no single data.pkl entry)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise TorchFileError(f"{source}: unknown byteorder {byteorder!r}")
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), source, storages, legacy=False).load()
        for key, st in storages.items():
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise TorchFileError(f"{source}: storage entry {entry} is missing")
            st.data = _storage_array(zf.read(entry), st, source, byteorder)
    return _resolve(obj, source, byteorder)


def _load_legacy(path: Path) -> Any:
    source = str(path)
    storages: dict[str, _Storage] = {}
    size = path.stat().st_size
    with open(path, "rb") as f:
        # The three header pickles hold only ints and a dict; the restricted unpickler reads them too.
        header = [_RestrictedUnpickler(f, source, storages, legacy=True).load() for _ in range(3)]
        magic, protocol, sys_info = header
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL or not isinstance(sys_info, dict):
            raise TorchFileError(f"{source}: not a torch.save file (bad legacy magic number / protocol)")
        byteorder = "little" if sys_info.get("little_endian", True) else "big"
        obj = _RestrictedUnpickler(f, source, storages, legacy=True).load()
        keys = _RestrictedUnpickler(f, source, storages, legacy=True).load()
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TorchFileError(f"{source}: malformed legacy storage key list")
        for key in keys:
            st = storages.get(key)
            if st is None:
                raise TorchFileError(f"{source}: legacy storage {key} is not referenced by the pickle")
            head = f.read(8)
            if len(head) != 8:
                raise TorchFileError(f"{source}: truncated before storage {key}")
            (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", head)
            if numel != st.numel:
                raise TorchFileError(f"{source}: storage {key} holds {numel} elements, pickle says {st.numel}")
            if numel * st.dtype.itemsize > size - f.tell():  # check before read() allocates the buffer
                raise TorchFileError(f"{source}: storage {key} is truncated (file ends early)")
            st.data = _storage_array(f.read(numel * st.dtype.itemsize), st, source, byteorder)
    for st in list(storages.values()):
        if st.view_of is not None:
            root_key, offset = st.view_of
            root = storages.get(root_key)
            if root is None or root.data is None or offset + st.numel > root.data.size:
                raise TorchFileError(f"{source}: storage view {st.key} points outside storage {root_key}")
            st.data = root.data[offset : offset + st.numel]
    return _resolve(obj, source, byteorder)


def load_torch_file(path: str | Path) -> Any:
    """Unpickle a ``torch.save`` file safely; tensors come back as NumPy arrays (zip or legacy format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    loader = _load_zip if head.startswith(b"PK\x03\x04") else _load_legacy if head[:1] == b"\x80" else None
    if loader is not None:
        try:
            return loader(path)
        except (UnsafePickleError, TorchFileError):
            raise
        except Exception as e:  # noqa: BLE001 - any parser failure on a damaged untrusted file gets one message
            # a cut-off download or flipped bytes break the zip directory, a CRC, or the pickle stream (whose
            # opcodes then fail with EOFError, KeyError/IndexError on the memo, TypeError, ...)
            raise TorchFileError(
                f"{path}: damaged or truncated torch.save file ({type(e).__name__}: {e}); "
                f"it is {path.stat().st_size} bytes. Download or copy it again.") from e
    raise TorchFileError(f"{path}: neither a zip nor a legacy torch.save file (first bytes {head!r})")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    )


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A ``{name: array}`` state dict from a ``.pth`` file.

    Accepts a bare state dict, or a training checkpoint dict holding one under ``state_dict`` /
    ``model`` / ``model_state_dict`` / ``state_dict_ema``; strips a ``module.`` (DataParallel) prefix.
    """
    obj = load_torch_file(path)
    if not _is_tensor_dict(obj) and isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        raise TorchFileError(
            f"{path}: does not hold a state dict of tensors (top level is {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict) else "")
            + "). Save it with torch.save(model.state_dict(), path)."
        )
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
