"""Fetch Debian packages into a private prefix, without root and without touching the system.

apt-get runs with its own state (lists, archive cache, an empty dpkg status) under the
project cache, pointed at the Debian suites we ask for; each package is unpacked with
``dpkg -x``. Because the status file is empty, ``closure=True`` downloads a package's whole
dependency closure, which is what running trixie's QEMU on a bookworm host needs.

The mirror is the one the host's own apt already uses (read from its sources) so the
project names no host; ``DEVMODEL_DEBIAN_MIRROR`` overrides it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from images.cache import cache_dir, digest

log = logging.getLogger(__name__)

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SOURCE_FILES = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]


class DebianError(RuntimeError):
    """A package could not be fetched; the message says what to do."""


def host_mirror(sources: list[Path] | None = None) -> str:
    """The Debian archive URI the host's apt uses (first ``debian`` archive found).

    Both one-line (``deb [opts] URI suite``) and deb822 (``URIs:``) sources are read.
    """
    env = os.environ.get("DEVMODEL_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    for path in SOURCE_FILES if sources is None else sources:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        for uri in re.findall(r"(?:^deb(?:\s+\[[^\]]*\])?\s+|^URIs:\s*)(\S+)", path.read_text(errors="replace"), re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    raise DebianError("no Debian mirror found in the host's apt sources; set DEVMODEL_DEBIAN_MIRROR")


class AptState:
    """A private apt configuration for a fixed list of suites."""

    def __init__(self, suites: tuple[str, ...]) -> None:
        self.suites = suites
        self.root = cache_dir("apt", "-".join(suites))
        self._written = False

    def _options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::State": r / "state",
            "Dir::State::Lists": r / "state/lists",
            "Dir::State::status": r / "state/status",
            "Dir::Cache": r / "cache",
            "Dir::Cache::archives": r / "cache/archives",
            "Dir::Etc::sourcelist": r / "sources.list",
            "Dir::Etc::sourceparts": r / "sources.list.d",
            "Dir::Etc::preferences": r / "preferences",
            "Dir::Etc::preferencesparts": r / "preferences.d",
            "Dir::Etc::trusted": KEYRING,
            "Dir::Etc::trustedparts": r / "trusted.gpg.d",
            "APT::Install-Recommends": "false",
            "APT::Install-Suggests": "false",
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody"),
            "Debug::NoLocking": "true",
            "Acquire::Retries": "3",
        }
        return [f"-o{k}={v}" for k, v in opts.items()]

    def _write_config(self) -> None:
        if self._written:
            return
        r = self.root
        for d in ("state/lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d", "trusted.gpg.d"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "state/status").touch()
        (r / "preferences").touch()
        mirror = host_mirror()
        lines = [f"deb [signed-by={KEYRING}] {mirror} {suite} main" for suite in self.suites]
        (r / "sources.list").write_text("\n".join(lines) + "\n")
        self._written = True

    def run(self, *args: str, cwd: Path | None = None) -> str:
        """Run apt-get/apt-cache with the private state; raise DebianError with its output."""
        self._write_config()
        cmd = [args[0], *self._options(), *args[1:]]
        log.debug("apt: %s", " ".join(args))
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DebianError(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc.stdout

    def update(self) -> None:
        """Refresh the package lists once per cache (``refresh=True`` forces it)."""
        stamp = self.root / "state/updated"
        if not stamp.exists():
            self.run("apt-get", "update")
            stamp.touch()

    def depends(self, package: str) -> list[str]:
        """Direct dependencies of ``package`` (used to resolve metapackages like linux-image-amd64)."""
        self.update()
        out = self.run("apt-cache", "depends", package)
        return re.findall(r"^\s+Depends:\s+(\S+)", out, re.M)

    def version(self, package: str, suite: str | None = None) -> str:
        """The candidate version apt would fetch."""
        self.update()
        args = ["apt-cache", "policy", package]
        out = self.run(*args)
        m = re.search(r"Candidate:\s*(\S+)", out)
        if not m or m.group(1) == "(none)":
            raise DebianError(f"package {package} not found in {', '.join(self.suites)}")
        return m.group(1)

    def download(self, packages: list[str], closure: bool, target: str | None) -> list[Path]:
        """Download .deb files; with ``closure`` the whole dependency closure."""
        self.update()
        archives = self.root / "cache/archives"
        if closure:
            extra = ["-t", target] if target else []
            plan = self.run("apt-get", "install", "-s", *extra, *packages)
            wanted = re.findall(r"^Inst (\S+) \((\S+) .*\[(\S+)\]\)", plan, re.M)
            self.run("apt-get", "install", "-y", "--download-only", *extra, *packages)
            debs = [archives / f"{name}_{ver.replace(':', '%3a')}_{arch}.deb" for name, ver, arch in wanted]
            missing = [d.name for d in debs if not d.exists()]
            if missing:
                raise DebianError(f"apt did not download {', '.join(missing)}")
            return debs
        dl = self.root / "download"
        dl.mkdir(exist_ok=True)
        names = [f"{p}/{target}" if target else p for p in packages]
        self.run("apt-get", "download", *names, cwd=dl)
        return [next(dl.glob(f"{p.split('=')[0]}_*.deb")) for p in packages]


def unpack(debs: list[Path], dest: Path) -> None:
    """``dpkg -x`` every package into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)


def unpacked(packages: list[str], suite: str = "trixie-backports", closure: bool = False) -> Path:
    """Download ``packages`` from ``suite`` and return the root they were unpacked into.

    Cached by (suite, packages, closure): a second call downloads nothing. A ``-backports``
    suite is used together with its base suite, as Debian intends.
    """
    suites = (suite.removesuffix("-backports"), suite) if suite.endswith("-backports") else (suite,)
    key = digest(suites, sorted(packages), closure)
    dest = cache_dir("debian") / f"{suite}-{key}"
    done = dest / ".complete"
    if done.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    apt = AptState(suites)
    debs = apt.download(packages, closure, suite if suite.endswith("-backports") else None)
    log.info("unpacking %d packages into %s", len(debs), dest)
    unpack(debs, dest)
    done.write_text("\n".join(d.name for d in debs) + "\n")
    return dest
