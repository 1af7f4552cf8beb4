"""Python 3 for the guest: a trimmed Debian bookworm interpreter plus the project's record modules.

Why: the guest agent builds and parses the same byte-exact records (SMMU commands, events,
page requests) as the host-side models. Running Python in the guest lets it import those
very modules instead of re-declaring each layout in C or shell.

What goes in (all from bookworm packages, unpacked privately):

* ``/usr/bin/python3.11`` (+ ``python3`` link) and the shared libraries it and the chosen
  extension modules need, found by asking the packaged dynamic loader (``--list``);
* the import closure of :data:`STDLIB_MODULES` (and of the shared project modules), as
  sourceless ``.pyc`` files compiled by that same interpreter with unchecked hashes: the
  archive gives every file mtime 0, so timestamp-checked caches would always be stale;
* the project modules listed in :data:`SHARED_MODULES` plus every ``devmodel`` module they
  import at module level, under ``/usr/lib/python3/dist-packages`` (on Debian's default
  ``sys.path``), with generated side-effect-free package ``__init__`` files, sources kept
  for readable tracebacks;
* the guest agent package ``devmodel_agent`` (guest/agent; ``dm`` on the PATH comes from
  guest/rootfs) next to them, minus its host-only simulation module;
* a ``.pth`` putting ``/usr/lib/devmodel`` (the guest helpers in guest/rootfs) on sys.path.

The staged tree is checked on the host before use: the staged interpreter must import
every listed module from the staged tree alone. Cached by all inputs.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

from images import cpio
from images.cache import PROJECT_ROOT, cache_dir, digest, file_digest
from images.debian import unpacked
from images.kmod import Contribution

log = logging.getLogger(__name__)

SUITE = "bookworm"
PYTHON = "python3.11"
PACKAGES = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
            "libc6", "zlib1g", "libexpat1", "libffi8"]
#: Standard-library modules a guest agent may import; their whole import closure ships.
STDLIB_MODULES = (
    "argparse", "collections", "contextlib", "ctypes", "dataclasses", "enum", "errno", "fcntl",
    "functools", "io", "itertools", "json", "logging", "mmap", "os", "re", "select", "selectors",
    "signal", "stat", "struct", "sys", "time", "traceback", "typing", "runpy", "encodings.latin_1",
    "encodings.ascii",
    # The agent (``dm``) and what argparse / its help output import lazily.
    "locale", "gettext", "socket", "socketserver", "subprocess", "threading",
)
#: Project modules the guest shares with the host code (paths from the project root). The
#: ``devmodel`` modules they import at module level are added automatically.
SHARED_MODULES = ("devmodel/memory.py", "devmodel/iommu/records.py", "devmodel/iommu/registers.py",
                  "devmodel/iommu/builder.py", "devmodel/devices/dma_engine_records.py",
                  "devmodel/devices/nic_records.py", "devmodel/pci/regs.py",
                  "devmodel/viommu/registers.py")
#: Where shared project modules live in the guest (on Debian's default sys.path).
SITE_DIR = "usr/lib/python3/dist-packages"
#: Guest-side helpers shipped by guest/rootfs, put on sys.path through a .pth file.
HELPER_DIR = "usr/lib/devmodel"
HELPER_SOURCE = PROJECT_ROOT / "guest" / "rootfs" / HELPER_DIR
STDLIB_DIR = f"usr/lib/{PYTHON}"
#: The guest agent package (``dm``), shipped next to the shared modules; host-only modules stay out.
AGENT_SOURCE = PROJECT_ROOT / "guest" / "agent" / "devmodel_agent"
AGENT_HOST_ONLY = ("hostsim.py",)
#: Never shipped: Debian's sitecustomize is a link to /etc outside the package root.
SKIP_STDLIB = ("sitecustomize",)
INIT_DOC = '"""Guest copy of {name}: only the modules the guest shares (see images/guest_python.py)."""\n'


class GuestPythonError(RuntimeError):
    """The guest interpreter could not be assembled; the message says which piece failed."""


# -- shared project modules -------------------------------------------------------------------
def _module_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements executed at import time (not in functions or ``if TYPE_CHECKING``)."""
    out: list[ast.stmt] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" not in test:
                todo[:0] = [*node.body, *node.orelse]
        elif isinstance(node, ast.Try):
            todo[:0] = [*node.body, *[s for h in node.handlers for s in h.body], *node.orelse, *node.finalbody]
    return out


def _module_file(dotted: str, root: Path) -> Path | None:
    """The project file that defines ``dotted`` (module or package), if any."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _dotted(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_imports(path: Path, root: Path = PROJECT_ROOT) -> list[Path]:
    """Project files ``path`` imports at module level (``devmodel`` modules only)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _dotted(path, root) if path.name == "__init__.py" else _dotted(path, root).rpartition(".")[0]
    found: list[Path] = []
    for node in _module_level_imports(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        for name in names:
            if name.split(".")[0] != "devmodel":
                continue
            target = _module_file(name, root)
            if target is not None and target != path:
                found.append(target)
    return found


def shared_closure(modules: tuple[str, ...] = SHARED_MODULES, root: Path = PROJECT_ROOT) -> list[Path]:
    """``modules`` (project-relative paths) and every project module they import, sorted."""
    todo = [root / m for m in modules]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        if not path.is_file():
            raise GuestPythonError(f"shared module {path.relative_to(root)} does not exist")
        seen.add(path)
        todo.extend(project_imports(path, root))
    # Package __init__ files are generated, never copied (they may import the world).
    return sorted(p for p in seen if p.name != "__init__.py")


def helper_sources() -> list[Path]:
    """Guest helper modules from guest/rootfs (the rootfs ships their sources)."""
    return sorted(HELPER_SOURCE.glob("*.py")) if HELPER_SOURCE.is_dir() else []


def agent_sources() -> list[Path]:
    """The guest agent's modules that ship (everything but the host-only simulation)."""
    if not AGENT_SOURCE.is_dir():
        return []
    return sorted(p for p in AGENT_SOURCE.glob("*.py") if p.name not in AGENT_HOST_ONLY)


def agent_module_names() -> list[str]:
    return [AGENT_SOURCE.name if p.stem == "__init__" else f"{AGENT_SOURCE.name}.{p.stem}"
            for p in agent_sources() if p.stem != "__main__"]


def _dotted_names(files: list[Path], root: Path = PROJECT_ROOT) -> list[str]:
    return [_dotted(p, root) for p in files]


# -- the interpreter ---------------------------------------------------------------------------
def _run(interp: list[str], script: str, env: dict[str, str], what: str, cwd: Path) -> str:
    """Run ``script``; ``cwd`` matters because ``-c`` puts the working directory on sys.path."""
    proc = subprocess.run([*interp, "-c", script], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)
    if proc.returncode != 0:
        raise GuestPythonError(f"{what} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def _interp(root: Path) -> tuple[list[str], dict[str, str]]:
    """Run the packaged interpreter on the host through the packaged loader and libraries."""
    libdirs = [root / "lib/x86_64-linux-gnu", root / "usr/lib/x86_64-linux-gnu"]
    loader = root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    argv = [str(loader), "--library-path", ":".join(map(str, libdirs)), str(root / "usr/bin" / PYTHON)]
    env = {"PYTHONHOME": str(root / "usr"), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "LC_ALL": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return argv, env


def stdlib_closure(root: Path, shared_site: Path, shared_names: list[str]) -> dict[str, Path]:
    """Stdlib files (relative to ``STDLIB_DIR``) that importing everything wanted loads."""
    argv, env = _interp(root)
    env["PYTHONPATH"] = f"{shared_site}:{HELPER_SOURCE}"
    wanted = [*STDLIB_MODULES, *shared_names, *(p.stem for p in helper_sources()), *agent_module_names()]
    script = ("import importlib, json, sys\n"
              f"for m in {wanted!r}: importlib.import_module(m)\n"
              "print(json.dumps({k: getattr(v, '__file__', None) for k, v in sys.modules.items()}))")
    files = json.loads(_run(argv, script, env, "listing the guest's stdlib modules", shared_site))
    stdlib = root / STDLIB_DIR
    out: dict[str, Path] = {}
    for name, file in files.items():
        if not file or name in SKIP_STDLIB:
            continue
        path = Path(file)
        if path.is_relative_to(stdlib):
            out[str(path.relative_to(stdlib))] = path
    log.info("guest stdlib closure: %d files", len(out))
    return out


def needed_libraries(root: Path, elves: list[Path]) -> dict[str, Path]:
    """Guest path -> file for every shared library ``elves`` load (packaged loader's --list)."""
    loader = root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    libpath = f"{root / 'lib/x86_64-linux-gnu'}:{root / 'usr/lib/x86_64-linux-gnu'}"
    out = {"lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": loader}
    for elf in elves:
        proc = subprocess.run([str(loader), "--library-path", libpath, "--list", str(elf)],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise GuestPythonError(f"cannot list the libraries of {elf.name}: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[1] != "=>":
                continue
            soname, path = parts[0], Path(parts[2])
            if "/" in soname:
                continue  # the program interpreter (/lib64/ld-linux...): shipped above
            if not path.is_relative_to(root):
                raise GuestPythonError(f"{elf.name} needs {soname}, which no package in {PACKAGES} provides")
            out[str(path.parent.relative_to(root) / soname)] = path
    log.info("guest shared libraries: %s", ", ".join(sorted(Path(k).name for k in out)))
    return out


def _compile(root: Path, jobs: list[tuple[Path, Path, str]]) -> None:
    """Byte-compile (source, pyc, name shown in tracebacks) with the guest interpreter itself."""
    argv, env = _interp(root)
    script = ("import json, py_compile, sys\n"
              "for src, dst, shown in json.load(sys.stdin):\n"
              "    py_compile.compile(src, cfile=dst, dfile=shown, doraise=True,\n"
              "                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n")
    payload = json.dumps([[str(s), str(d), g] for s, d, g in jobs])
    proc = subprocess.run([*argv, "-c", script], input=payload, capture_output=True, text=True, env=env, timeout=300,
                          cwd=root)
    if proc.returncode != 0:
        raise GuestPythonError(f"byte-compiling for the guest failed:\n{proc.stderr[-3000:]}")


# -- staging -----------------------------------------------------------------------------------
def _copy(src: Path, dst: Path, stage: Path) -> None:
    """Copy one file into the stage; refuse any destination outside it (or through a link)."""
    if not dst.is_absolute() or not dst.parent.resolve().is_relative_to(stage.resolve()) or dst.is_symlink():
        raise GuestPythonError(f"refusing to write {dst}: outside the staging tree {stage}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    shutil.copymode(src, dst)


def _stage_shared(stage: Path, shared: list[Path]) -> list[tuple[Path, Path, str]]:
    """Copy shared modules with generated package __init__ files; return compile jobs."""
    site = stage / SITE_DIR
    jobs = []
    packages: set[Path] = set()
    for path in shared:
        rel = path.relative_to(PROJECT_ROOT)
        _copy(path, site / rel, stage)
        packages.update(p for p in rel.parents if str(p) != ".")
    for pkg in packages:
        init = site / pkg / "__init__.py"
        init.write_text(INIT_DOC.format(name=".".join(pkg.parts)))
    for path in agent_sources():
        _copy(path, site / AGENT_SOURCE.name / path.name, stage)
    for src in sorted(site.rglob("*.py")):
        rel = src.relative_to(stage)
        pyc = src.parent / "__pycache__" / f"{src.stem}.cpython-311.pyc"
        pyc.parent.mkdir(exist_ok=True)
        jobs.append((src, pyc, "/" + str(rel)))
    (site / "devmodel-guest-helpers.pth").write_text(f"/{HELPER_DIR}\n")
    # Helpers' sources come from the rootfs; ship their compiled form next to them.
    for src in helper_sources():
        pyc = stage / HELPER_DIR / "__pycache__" / f"{src.stem}.cpython-311.pyc"
        pyc.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((src, pyc, f"/{HELPER_DIR}/{src.name}"))
    return jobs


def _stage(root: Path, stage: Path, shared: list[Path]) -> None:
    """Assemble the guest's Python tree under ``stage`` (mirrors the guest's /)."""
    jobs = _stage_shared(stage, shared)
    stdlib = stdlib_closure(root, stage / SITE_DIR, _dotted_names(shared))
    for rel, src in stdlib.items():
        dst = stage / STDLIB_DIR / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".py":
            jobs.append((src, dst.with_suffix(".pyc"), f"/{STDLIB_DIR}/{rel}"))
        else:
            _copy(src, dst, stage)
    _compile(root, jobs)
    binary = root / "usr/bin" / PYTHON
    _copy(binary, stage / "usr/bin" / PYTHON, stage)
    (stage / "usr/bin/python3").symlink_to(PYTHON)
    extensions = [p for p in stdlib.values() if p.suffix == ".so"]
    for rel, src in needed_libraries(root, [binary, *extensions]).items():
        _copy(src, stage / rel, stage)
    (stage / "lib64").mkdir(exist_ok=True)
    (stage / "lib64/ld-linux-x86-64.so.2").symlink_to("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")


def _validate(stage: Path, shared_names: list[str]) -> None:
    """The staged interpreter imports everything wanted from the staged tree alone."""
    argv, env = _interp(stage)
    env["PYTHONPATH"] = str(HELPER_SOURCE)
    wanted = [*STDLIB_MODULES, *shared_names, *(p.stem for p in helper_sources()), *agent_module_names()]
    script = ("import importlib, sys\n"
              f"for m in {wanted!r}: importlib.import_module(m)\n"
              f"prefixes = (sys.prefix.rstrip('/') + '/', {str(HELPER_SOURCE) + '/'!r})\n"
              "bad = [f for f in (getattr(m, '__file__', None) for m in list(sys.modules.values()))\n"
              "       if f and not f.startswith(prefixes)]\n"
              "assert not bad, f'loaded from outside the guest tree: {bad}'\n")
    _run(argv, script, env, "checking the staged guest Python", stage)


def key() -> str:
    """Cache key over every input: packages, module lists, shared sources, this builder."""
    shared = shared_closure()
    return digest(SUITE, PACKAGES, STDLIB_MODULES, SHARED_MODULES, SITE_DIR, HELPER_DIR,
                  [str(p.relative_to(PROJECT_ROOT)) for p in shared], [p.name for p in helper_sources()],
                  [p.name for p in agent_sources()],
                  file_digest(*shared, *helper_sources(), *agent_sources(), Path(__file__)))


def staged() -> Path:
    """The staged guest Python tree (built once per :func:`key`)."""
    k = key()
    final = cache_dir("guest-python") / k
    if (final / ".complete").exists():
        return final
    # Stage privately, then rename: concurrent builders (parallel test runs) never see a
    # half-built tree, and the loser of the rename race just drops its copy.
    stage = final.with_name(f"{k}.tmp-{os.getpid()}")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    shared = shared_closure()
    log.info("staging guest Python (%d shared project modules)", len(shared))
    root = unpacked(PACKAGES, SUITE)
    try:
        _stage(root, stage, shared)
        _validate(stage, _dotted_names(shared))
        log.info("guest Python staged and checked: %.1f MB uncompressed", size(stage) / 1e6)
        (stage / ".complete").write_text(k + "\n")
        if final.exists() and not (final / ".complete").exists():
            shutil.rmtree(final)  # a crashed earlier build
        stage.rename(final)
    except OSError:
        if not (final / ".complete").exists():
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


def tree_entries(stage: Path) -> list[cpio.Entry]:
    """Archive members for every directory, file and link of ``stage`` (parents first)."""
    out: list[cpio.Entry] = []
    for path in sorted(stage.rglob("*")):
        rel = str(path.relative_to(stage))
        if path.name == ".complete":
            continue
        if path.is_symlink():
            out.append(cpio.symlink(rel, os.readlink(path)))
        elif path.is_dir():
            out.append(cpio.directory(rel))
        else:
            out.append(cpio.regular(rel, path.read_bytes(), executable=bool(path.stat().st_mode & stat.S_IXUSR)))
    return out


def size(stage: Path) -> int:
    """Bytes of regular files in the staged tree (what the initramfs grows by, uncompressed)."""
    return sum(p.stat().st_size for p in stage.rglob("*") if p.is_file() and not p.is_symlink())


def contribution() -> Contribution:
    """The guest Python as initramfs entries."""
    stage = staged()
    return Contribution(key=stage.name, entries=tree_entries(stage))
