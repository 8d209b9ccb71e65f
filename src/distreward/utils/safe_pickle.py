"""A restricted unpickler: read .pkl files (EDM2 network snapshots, reference statistics) without running their code.

`pickle.load` calls whatever global a file names, so an untrusted .pkl can run anything. `safe_load` resolves
only an allow-list of globals:

- tensor rebuilding (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter[_with_state]`,
  `torch._tensor._rebuild_from_type_v2`, `torch.storage._load_from_bytes`; storages are re-read with
  `torch.load(weights_only=True)`), torch dtypes, `torch.Size`, `torch.device`;
- numpy array / dtype / scalar rebuilding (`numpy[._]core.multiarray._reconstruct`, `scalar`, `numpy.ndarray`,
  `numpy.dtype`, `numpy[._]core.numeric._frombuffer`);
- `collections.OrderedDict`, `builtins.set` / `frozenset` / `slice` / `complex` / `range` / `bytearray`,
  `_codecs.encode` (latin-1 bytes of protocol-2 pickles), `dnnlib[.util].EasyDict` (mapped to `EasyDict` here);
- `torch_utils.persistence._reconstruct_persistent_obj` (NVlabs' persistence objects, e.g. the networks in an EDM2
  snapshot). Their embedded source code is never executed: each becomes a `PersistentObject` record (class name,
  init args/kwargs, state), or, where `persistent_classes` maps its class name, whatever that factory builds;
- `torch.nn` containers (`ModuleDict`, `ModuleList`, `Sequential`) inside such objects, as `ModuleRecord`s.

Any other global raises `UnsafePickleError` naming it, before anything is called.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
from typing import Any, Callable, Mapping

import numpy as np
import torch

__all__ = ["safe_load", "UnsafePickleError", "PersistentObject", "ModuleRecord", "EasyDict", "module_state_dict"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that is not on the allow-list; nothing from it was executed."""


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


class PersistentObject:
    """An NVlabs persistence object read as data: class name, init args/kwargs and the pickled state.

    `module_src` is the source text the object carried; it is kept as a string and never executed.
    """

    def __init__(self, meta: Mapping[str, Any]):
        self.class_name = str(meta.get("class_name"))
        self.version = meta.get("version")
        self.module_src = meta.get("module_src")
        self.state = dict(meta.get("state") or {})
        self.init_args = tuple(self.state.get("_init_args") or ())
        self.init_kwargs = dict(self.state.get("_init_kwargs") or {})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return module_state_dict(self)

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name}, init_kwargs={self.init_kwargs})"


class ModuleRecord:
    """A plain `torch.nn` container (ModuleDict, ...) read as data; `state` is its pickled __dict__."""

    class_path = "torch.nn.Module"

    def __init__(self, *args: Any):
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{self.class_path}: expected a dict as module state, got {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_path})"


def module_state_dict(obj: PersistentObject | ModuleRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """The `state_dict()` the pickled module would return (parameters, persistent buffers, submodules, in order)."""
    state = obj.state
    out: dict[str, torch.Tensor] = {}
    for name, p in (state.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, b in (state.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b.detach()
    for name, m in (state.get("_modules") or {}).items():
        if m is None:
            continue
        if not isinstance(m, (PersistentObject, ModuleRecord)):
            raise TypeError(f"submodule {prefix + name} was read as {type(m).__name__}, not as a module record")
        out.update(module_state_dict(m, prefix + name + "."))
    return out


# --- allowed rebuild functions (thin checks in front of torch's own) ----------------------------------------------

def _no_hooks(hooks: Any, what: str) -> None:
    if hooks:
        raise UnsafePickleError(f"{what}: the pickle attaches backward hooks; refusing to load them")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, torch.TypedStorage):
        raise UnsafePickleError(f"_rebuild_tensor_v2: expected a torch storage, got {type(storage).__name__}")
    _no_hooks(backward_hooks, "_rebuild_tensor_v2")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                            collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    _no_hooks(backward_hooks, "_rebuild_parameter")
    return torch.nn.Parameter(data, requires_grad)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:
        raise UnsafePickleError("_rebuild_parameter_with_state: parameters with Python attributes are not supported")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_TENSOR_REBUILDERS = (_rebuild_tensor_v2, _rebuild_parameter, _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _TENSOR_REBUILDERS or new_type not in (torch.Tensor, torch.nn.Parameter) or state:
        raise UnsafePickleError("_rebuild_from_type_v2: only plain tensors and parameters can be rebuilt")
    ret = func(*args)
    return ret if type(ret) is new_type else ret.as_subclass(new_type)


def _load_storage_from_bytes(b: bytes):
    """A storage pickled by `torch.storage` is a nested torch.save stream: read it with weights_only=True."""
    return torch.load(io.BytesIO(b), weights_only=True)


def _codecs_encode(text: str, encoding: str = "utf-8"):
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode: only latin1 (protocol-2 bytes) is allowed, got {encoding!r}")
    return text.encode("latin1")


def _module_record_type(path: str) -> type:
    return type(path.rsplit(".", 1)[-1] + "Record", (ModuleRecord,), {"class_path": path})


def _numpy_globals() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        out[(f"{mod}.multiarray", "scalar")] = core.multiarray.scalar
        out[(f"{mod}.numeric", "_frombuffer")] = core.numeric._frombuffer
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "Int16DType", "Int8DType",
                 "UInt64DType", "UInt32DType", "UInt16DType", "UInt8DType", "BoolDType", "Complex64DType",
                 "Complex128DType"):
        if hasattr(np.dtypes, name):
            out[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return out


_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")
_BASE_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("builtins", t.__name__): t for t in (set, frozenset, slice, complex, range, bytearray)},
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    **{("torch.nn.modules.container", n): _module_record_type(f"torch.nn.modules.container.{n}") for n in _CONTAINERS},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_classes: Mapping[str, Callable[[PersistentObject], Any]] | None, source: str):
        super().__init__(file)
        self._factories = dict(persistent_classes or {})
        self._source = source
        self._allowed = {**_BASE_ALLOWED, **_numpy_globals()}
        self._allowed[("torch_utils.persistence", "_reconstruct_persistent_obj")] = self._reconstruct_persistent_obj

    def find_class(self, module: str, name: str) -> Any:
        key = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        module, name = key
        if key in self._allowed:
            return self._allowed[key]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(
            f"{self._source}: refusing to load the global '{module}.{name}' (it could run arbitrary code). "
            "distreward.utils.safe_pickle allows only tensor/numpy/collections rebuild functions and NVlabs "
            "persistence objects; convert the file to .safetensors/.npz, or load it with pickle only if you trust it.")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: persistent ids are not supported ({pid!r}); is this a torch.save "
                                "file? Load it with torch.load(path, weights_only=True) instead")

    def _reconstruct_persistent_obj(self, meta: Any) -> Any:
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
            raise UnsafePickleError(f"{self._source}: malformed persistence record (expected a dict with type 'class' "
                                    "and a state dict)")
        record = PersistentObject(meta)
        factory = self._factories.get(record.class_name)
        return factory(record) if factory is not None else record


def safe_load(file_or_path: str | os.PathLike | bytes | Any, *,
              persistent_classes: Mapping[str, Callable[[PersistentObject], Any]] | None = None) -> Any:
    """Unpickle a path, bytes or binary file object with the allow-list above; never calls anything else.

    persistent_classes: class name -> factory(PersistentObject) for NVlabs persistence objects (e.g.
    {"Precond": build_from_record}); unmapped ones come back as `PersistentObject` records.
    """
    if isinstance(file_or_path, (bytes, bytearray, memoryview)):
        return _RestrictedUnpickler(io.BytesIO(bytes(file_or_path)), persistent_classes, "<bytes>").load()
    if isinstance(file_or_path, (str, os.PathLike)):
        path = os.fspath(file_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pickle file {path} not found")
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, persistent_classes, path).load()
    if hasattr(file_or_path, "read"):
        return _RestrictedUnpickler(file_or_path, persistent_classes, getattr(file_or_path, "name", "<file>")).load()
    raise TypeError(f"safe_load expects a path, bytes or a binary file object, got {type(file_or_path).__name__}")
