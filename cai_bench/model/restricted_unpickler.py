"""Read the tensors out of a whole pickled model (``torch.save(model)``) without running anything from it.

``torch.load`` of such a file imports the classes it names and calls whatever the pickle says, so a file can
run any code. Here the pickle is read by an unpickler whose ``find_class`` knows a short list of names:

- tensor building blocks (``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``, the ``torch.*Storage``
  markers, dtypes, ``collections.OrderedDict``, ``set``) map to our own functions, which only reshape bytes read
  from the archive into tensors;
- module classes (upstream's ``blocks.model_vit_inception.ViT_Astro``, ``blocks.photoz.*``, ``NormalCell.*``,
  and anything under ``torch.nn.`` or ``timm.``) map to inert placeholders that only keep the state the pickle
  hands them; no module is imported, no constructor or ``__setstate__`` of the real class runs;
- every other name (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) is refused with an error that
  names it, before anything is called.

The module tree of placeholders is then walked (through a DataParallel wrapper) to a state dict in upstream's
key layout.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from cai_bench.core.errors import UserError

# The upstream project's classes, as spec/model.md names them.
UPSTREAM_CLASSES = {
    ("blocks.model_vit_inception", "ViT_Astro"),
    ("blocks.photoz", "Input_Mix_Model"),
    ("blocks.photoz", "InceptionBlock"),
    ("blocks.photoz", "ConvBlock"),
    ("NormalCell", "NormalCell"),
    ("NormalCell", "Attention"),
    ("NormalCell", "Mlp"),
    ("timm.models.layers.patch_embed", "PatchEmbed"),
}
# Library classes a pickled model may name; they become placeholders too (their code never runs).
PLACEHOLDER_PREFIXES = ("torch.nn.", "timm.")

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


class Placeholder:
    """Stands in for a class a pickle names: keeps the arguments and state it is given, and does nothing else."""

    qualified_name = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, {}

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder {self.qualified_name}>"


class _Storage:
    """What a ``torch.FloatStorage`` global stands for in a pickle: the dtype of the bytes in the archive."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("a tensor without storage")
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def _rebuild_parameter(data, *_ignored):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


def _device(*args) -> str:
    return ":".join(str(a) for a in args)


def _torch_size(*args) -> tuple:
    return tuple(*args)


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch", "device"): _device,
    ("torch", "Size"): _torch_size,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        # torch.save writes protocol 2, which spells standard modules as Python 2 did (__builtin__, commands):
        # translate them back as pickle itself does, so that allowing and refusing go by the real names
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in UPSTREAM_CLASSES or module.startswith(PLACEHOLDER_PREFIXES):
            return self._placeholder(module, name)
        if (module, name) == ("functools", "partial"):  # e.g. a stored norm_layer=partial(LayerNorm, eps=1e-6)
            return self._placeholder(module, name)
        raise RefusedGlobal(f"{module}.{name}")

    def _placeholder(self, module: str, name: str) -> type:
        key = (module, name)
        if key not in self._placeholders:
            self._placeholders[key] = type(name, (Placeholder,), {"qualified_name": f"{module}.{name}"})
        return self._placeholders[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _Storage):
            raise pickle.UnpicklingError("a storage of unknown type")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
            dtype = storage_type.dtype
            size = torch.empty((), dtype=dtype).element_size()
            if storage_type.name != "UntypedStorage" and len(raw) != numel * size:
                raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, expected {numel * size}")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self._storages[key] = flat
        return self._storages[key]


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global that is not on the list; nothing of it was imported or called."""


def load_pickled_model(path: str | Path) -> object:
    """The object tree of a ``torch.save`` zip archive, with placeholders for classes and tensors for tensors."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception:  # BadZipFile, OSError, and what a damaged directory makes zipfile raise besides
        raise UserError(
            f"{path}: not a PyTorch zip archive (torch.save since torch 1.6); files in the legacy format are not read"
        ) from None
    with archive:
        pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise UserError(f"{path}: not a PyTorch archive (expected one <name>/data.pkl, found {len(pickles)})")
        prefix = pickles[0].split("/")[0]
        try:
            if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder").strip() != b"little":
                raise UserError(f"{path}: saved on a big-endian machine; re-save it on a little-endian one")
            return _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix).load()
        except UserError:
            raise
        except RefusedGlobal as exc:
            raise UserError(
                f"{path}: refused: the pickle calls {exc}, which is not a tensor or a model class; nothing was run"
            ) from None
        except Exception as e:  # a damaged archive or pickle fails in many ways (CRC, opcodes, text, sizes)
            raise UserError(f"{path}: not a readable pickled model ({type(e).__name__}: {e})") from None


def module_state_dict(obj: object, path: str | Path = "model") -> dict[str, torch.Tensor]:
    """Walk a tree of module placeholders to ``{dotted.key: tensor}`` as ``nn.Module.state_dict()`` would.

    A shared submodule (upstream's first Inception convolution) appears under each of its names, as in a real
    state dict; a parameter or buffer set to None, and non-persistent buffers, are left out.
    """
    out: dict[str, torch.Tensor] = {}

    def walk(module: object, prefix: str, depth: int) -> None:
        if not isinstance(module, Placeholder) or not isinstance(module.state, dict):
            raise UserError(f"{path}: {prefix or 'the top object'} is not a module ({type(module).__name__})")
        if depth > 64:
            raise UserError(f"{path}: the module tree is deeper than 64 levels")
        state = module.state
        tables = {kind: state.get(kind) or {} for kind in ("_parameters", "_buffers", "_modules")}
        skip = state.get("_non_persistent_buffers_set") or set()
        if not all(isinstance(t, dict) for t in tables.values()) or not isinstance(skip, (set, frozenset)):
            raise UserError(f"{path}: {prefix or 'the top object'} does not hold a module's state")
        for kind in ("_parameters", "_buffers"):
            for name, tensor in tables[kind].items():
                if tensor is None or name in skip:
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise UserError(f"{path}: {prefix}{name} is a {type(tensor).__name__}, not a tensor")
                out[prefix + name] = tensor
        for name, child in tables["_modules"].items():
            if child is not None:
                walk(child, f"{prefix}{name}.", depth + 1)

    walk(obj, "", 0)
    if not out:
        raise UserError(f"{path}: the pickled model holds no tensors")
    return out
