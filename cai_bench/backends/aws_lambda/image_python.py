"""The image's Python for emulated functions: an interpreter whose site-packages hold what the function's image
installs (the Dockerfile's ``*_PACKAGES`` lists and what those packages require) and nothing else, made once
per machine in the cache (``CAI_BENCH_CACHE``), per the versions it links.

An emulated execution environment runs on it, so a dependency the Dockerfile forgot, or a torch import in a
torch-free function, fails here as it would on AWS, not first there. Nothing is downloaded: the packages are this
interpreter's own installed copies, linked file by file (their RECORD) into a site-packages of their own, beside
cai_bench's source as the Dockerfile copies it in. A package the image installs that this interpreter lacks, or
holds at a version the Dockerfile does not take, is one error line."""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from cai_bench.core.errors import UserError
from cai_bench.core.files import cache_dir, exclusive

# The checkout's Dockerfile; a package installed from a wheel has none, and its emulator runs this interpreter
DOCKERFILE = Path(__file__).resolve().parents[3] / "deploy" / "lambda" / "Dockerfile"
_PACKAGES_ARG = re.compile(r'^ARG\s+(?P<name>[A-Z]+)_PACKAGES="(?P<list>[^"]*)"\s*$', re.M)
# The flavour a function's runtime runs in: its own list on top of the handler's
_FLAVOURS = {"torch": "TORCH", "onnxruntime": "ONNXRUNTIME", "openvino": "OPENVINO", "none": None}


def package_lists(dockerfile: Path) -> dict[str, list[str]]:
    """Each ``ARG <NAME>_PACKAGES="..."`` of the Dockerfile: NAME -> its requirements."""
    try:
        text = dockerfile.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{dockerfile}: cannot read the image's Dockerfile ({exc})") from None
    lists = {m["name"]: m["list"].split() for m in _PACKAGES_ARG.finditer(text)}
    if "HANDLER" not in lists:
        raise UserError(f'{dockerfile}: no ARG HANDLER_PACKAGES="..." line, the packages every flavour installs')
    return lists


def image_requirements(dockerfile: Path, flavour: str) -> list[str]:
    """What the image of ``flavour`` (a runtime, or "none": the handler's packages alone) installs by name."""
    if flavour not in _FLAVOURS:
        raise UserError(f"no image flavour {flavour!r}: one of {', '.join(_FLAVOURS)}")
    lists = package_lists(dockerfile)
    own = _FLAVOURS[flavour]
    if own is not None and own not in lists:
        raise UserError(f'{dockerfile}: no ARG {own}_PACKAGES="..." line for the {flavour} image')
    return lists["HANDLER"] + (lists[own] if own else [])


def closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions ``requirements`` name, and theirs, as pip would install them here."""
    found: dict[str, metadata.Distribution] = {}
    extras_seen: dict[str, set[str]] = {}
    todo = []
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            raise UserError(f"the Dockerfile: {text!r} is not a requirement pip reads") from None
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            todo.append((requirement, "the Dockerfile"))
    while todo:
        requirement, wanted_by = todo.pop()
        name = canonicalize_name(requirement.name)
        if name not in found:
            found[name] = _installed(requirement, wanted_by)
            extras_seen[name] = set()
        new_extras = ({""} | set(requirement.extras)) - extras_seen[name]
        extras_seen[name] |= new_extras
        for child in map(Requirement, found[name].requires or ()):
            # A child's marker is weighed here, against the extras it was asked with: "extra == 'cufile'"
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in new_extras):
                todo.append((child, requirement.name))
    return [found[name] for name in sorted(found)]


def _installed(requirement: Requirement, wanted_by: str) -> metadata.Distribution:
    try:
        distribution = metadata.distribution(requirement.name)
    except metadata.PackageNotFoundError:
        raise UserError(f"the Lambda image installs {requirement.name} (for {wanted_by}), which this Python "
                        f"lacks: pip install '{requirement}' to emulate the image") from None  # fmt: skip
    if not requirement.specifier.contains(distribution.version, prereleases=True):
        raise UserError(f"the Lambda image takes {requirement} (for {wanted_by}); this Python has "
                        f"{distribution.version}")  # fmt: skip
    return distribution


def _link_distribution(distribution: metadata.Distribution, site: Path) -> None:
    """Link each installed file of ``distribution`` (and its bytecode) into ``site``."""
    root = Path(distribution.locate_file("")).resolve()
    for entry in distribution.files or ():
        source = Path(distribution.locate_file(entry)).resolve()
        try:
            relative = source.relative_to(root)
        except ValueError:
            continue  # a script in bin/, a header: not in site-packages
        if not source.is_file() or relative.parts[0] == "__pycache__":
            continue
        targets = [(source, site / relative)]
        if source.suffix == ".py":
            cached = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
            targets.append((cached, site / relative.parent / "__pycache__" / cached.name))
        for origin, link in targets:
            if origin.is_file() and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(origin)


@dataclass(frozen=True)
class ImagePython:
    """An interpreter with the image's site-packages."""

    python: str
    flavour: str
    packages: tuple[str, ...]  # name==version of each distribution in it

    def describe(self) -> dict:
        return {"flavour": self.flavour, "python": self.python, "packages": list(self.packages)}


def build_image_python(dockerfile: Path, flavour: str, where: Path) -> ImagePython:
    """A virtual environment under ``where`` (made once per its requirements) with the image's packages alone."""
    requirements = image_requirements(dockerfile, flavour)
    distributions = closure(requirements)
    packages = tuple(f"{d.metadata['Name']}=={d.version}" for d in distributions)
    package_source = Path(__file__).resolve().parents[2]  # cai_bench/
    key = hashlib.sha256("\n".join((*packages, str(package_source), sys.executable)).encode()).hexdigest()[:16]
    home = where / f"{flavour}-{key}"
    python = home / "bin" / "python"
    with exclusive(where / f"{home.name}.lock"):  # another process making the same one waits, then takes it
        if not (home / ".complete").exists():
            _make(home, python, distributions, packages, package_source)
    return ImagePython(str(python), flavour, packages)


def _make(home: Path, python: Path, distributions: list, packages: tuple, package_source: Path) -> None:
    shutil.rmtree(home, ignore_errors=True)  # a make cut short before: from scratch
    # No pip, no system site-packages: only what is linked in below
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True, stdout=subprocess.DEVNULL)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
    for distribution in distributions:
        _link_distribution(distribution, site)
    (site / "cai_bench").symlink_to(package_source)  # the Dockerfile's COPY cai_bench
    (home / ".complete").write_text("\n".join(packages) + "\n")  # last: what is there is whole


_BUILT: dict[tuple[str, str], ImagePython] = {}
_LOCK = threading.Lock()


def image_python(flavour: str, dockerfile: Path | None = None) -> ImagePython | None:
    """The image's Python for ``flavour``, made once per machine (per its packages' versions) in the cache; None
    where there is no Dockerfile to read (an installed package, not a checkout)."""
    dockerfile = dockerfile or DOCKERFILE
    if not dockerfile.is_file():
        return None
    with _LOCK:
        key = (str(dockerfile), flavour)
        if key not in _BUILT:
            _BUILT[key] = build_image_python(dockerfile, flavour, cache_dir() / "image-python")
        return _BUILT[key]
