"""The backends by name: the built-in ones, those that installed packages declare in the ``cai_bench.backends``
entry-point group, and those a program adds with ``register_backend``. This one registry is where ``--backend``
takes its choices, run, predict and sweep their flags, and ``--help`` its text, so a plugin's backend is a
backend like the others.

A plugin declares, in its own ``pyproject.toml``::

    [project.entry-points."cai_bench.backends"]
    toy = "toy_backend:create"

where ``create()`` returns a ``base.Backend``. A built-in name cannot be taken over: such a plugin is left out,
with a warning. Backend modules are imported when a backend is chosen or the flags are listed (they import no
torch until they run).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata

from cai_bench.backends.base import Backend, BackendOption
from cai_bench.core.errors import UserError

ENTRY_POINTS = "cai_bench.backends"
# name -> module that defines ``create() -> Backend``, imported only when chosen; the order --backend shows
BUILT_IN = {
    "cpu": "cai_bench.backends.cpu",
    "hpc": "cai_bench.backends.hpc",
    "gpu": "cai_bench.backends.gpu.backend",
    "lambda": "cai_bench.backends.aws_lambda.driver",
    "dask": "cai_bench.backends.dask.backend",
}
_REGISTERED: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, create: Callable[[], Backend]) -> None:
    """Add a backend by name from a running program (a test's toy backend); installed packages use the entry
    point group instead, so that the command line knows them too."""
    _REGISTERED[name] = create


@lru_cache(maxsize=1)
def _plugins() -> dict[str, metadata.EntryPoint]:
    found = {}
    for entry in metadata.entry_points(group=ENTRY_POINTS):
        if entry.name in BUILT_IN:
            print(f"warning: {entry.value} declares backend {entry.name!r}, a built-in one; left out", file=sys.stderr)
            continue
        found.setdefault(entry.name, entry)
    return found


def available_backends() -> list[str]:
    """Every backend name: the built-in ones in their order, then the plugins', then the registered ones."""
    return list(dict.fromkeys([*BUILT_IN, *sorted(_plugins()), *_REGISTERED]))


def get_backend(name: str) -> Backend:
    if name in _REGISTERED:
        return _REGISTERED[name]()
    if name in BUILT_IN:
        return importlib.import_module(BUILT_IN[name]).create()
    if name in _plugins():
        try:
            create = _plugins()[name].load()
        except Exception as exc:  # a plugin's own import error: named, not a traceback of ours
            raise UserError(f"backend {name!r} ({_plugins()[name].value}) does not load: {exc}") from None
        return create()
    raise UserError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")


def declared_options(name: str) -> tuple[BackendOption, ...] | None:
    """The options backend ``name`` declares; None for a backend this cai-bench does not have."""
    try:
        return tuple(get_backend(name).options)
    except UserError:
        return None


def all_options() -> dict[str, tuple[BackendOption, list[str]]]:
    """Every option any backend declares, with the backends that take it, in the order of ``available_backends``:
    what run, predict and sweep have a flag for. An option several backends take is one declaration, so it has
    one flag and one help text; two different declarations under one name are refused."""
    out: dict[str, tuple[BackendOption, list[str]]] = {}
    for name in available_backends():
        for option in get_backend(name).options:
            if option.name not in out:
                out[option.name] = (option, [name])
                continue
            known, takers = out[option.name]
            if option != known:
                raise UserError(
                    f"backends {takers[0]} and {name} declare {option.flag} differently: a backend takes a shared "
                    "option as declared (backends/options.py) or gives its own a name of its own"
                )
            takers.append(name)
    return out


def requested_runtime(backend: Backend, options: dict) -> str:
    """--runtime as given; without it "auto" where the backend takes --runtime and its workers run on this machine
    (it declares ``worker_layout``, which the probe starts each runtime with), else torch."""
    given = options.get("runtime")
    if given:
        return given
    takes = any(o.name == "runtime" for o in backend.options)
    return "auto" if takes and hasattr(backend, "worker_layout") else "torch"


def check_options(backend: Backend, options: dict) -> dict:
    """``options`` checked against what ``backend`` declares: an option it does not take is one clear error."""
    declared = {o.name: o for o in backend.options}
    unknown = sorted(set(options) - set(declared))
    if unknown:
        flags = ", ".join(_flag(name) for name in unknown)
        raise UserError(f"{flags}: not an option of --backend {backend.name}")
    checked = {name: declared[name].check(value) for name, value in options.items() if value is not None}
    backend.check(checked)
    return checked


def _flag(name: str) -> str:
    known = all_options().get(name)
    return known[0].flag if known else "--" + name.replace("_", "-")


def check_precision(backend: Backend, precision: str) -> None:
    """Refuse a precision the backend does not run (tf32 and fp16 are CUDA's), before any work."""
    if precision not in getattr(backend, "precisions", (precision,)):
        takes = ", ".join(backend.precisions)
        raise UserError(f"--precision {precision}: --backend {backend.name} runs {takes}")
