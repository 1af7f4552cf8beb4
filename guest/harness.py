"""Boot the tiny guest in a real QEMU and drive its console with pexpect.

:class:`Guest` is the reusable piece behind the tests, ``devmodel run`` and the demo. It
always shuts QEMU down (context manager, ``close()``, and an ``atexit`` safety net), so no
QEMU process outlives a failing test. Every timeout is multiplied by
``DEVMODEL_TIMEOUT_SCALE`` (default 1) so a slow machine needs one knob, not many.

Every guest also gets a QMP socket (``GuestConfig.qmp_socket``, by default in a private
directory the harness creates and removes) and, once started, ``guest.qmp``: a connected
:class:`devmodel.qmp.QemuMonitor` for hot-plug and for shutting QEMU down when the guest
shell cannot (``close()``: guest ``poweroff -f``, then QMP ``quit``, then kill).

Console protocol (see the guest notes): after the ready marker we switch echo off and
empty the prompt, then each command is sent as ``cmd; echo @@RC=$?@@`` and its output is
everything before the marker.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pexpect

from devmodel.qmp import QemuMonitor
from images.accel import choose_accel
from images.initramfs import build as build_initramfs
from images.kernel import find_kernel
from images.qemu import qemu_argv

log = logging.getLogger(__name__)

READY_MARKER = "@@DEVMODEL-READY@@"
RC_RE = re.compile(r"@@RC=(\d+)@@\r*\n")
#: Reserved guest RAM the agent uses for queues, tables and DMA buffers (inside RAM with -m 1G).
RESERVED_BASE = 0x2000_0000
RESERVED_SIZE = 16 << 20
#: ``cryptomgr.notests`` skips the crypto self-tests (0.7 s of the 2.8 s TCG boot here);
#: ``tsc=reliable`` skips the clocksource watchdog's refinement wait.
DEFAULT_APPEND = (f"console=ttyS0 quiet panic=-1 memmap={RESERVED_SIZE >> 20}M${RESERVED_BASE:#x} "
                  "cryptomgr.notests tsc=reliable")
_LIVE: "weakref.WeakSet[Guest]" = weakref.WeakSet()
QMP_SOCKET_NAME = "qmp.sock"
#: Seconds (times the scale) for each shutdown step: the guest's poweroff -f takes well
#: under a second under TCG, QMP quit less; waiting longer only delays the next step.
POWEROFF_WAIT = 5.0
QUIT_WAIT = 5.0
QMP_CONNECT_TIMEOUT = 10.0


def timeout_scale() -> float:
    """``DEVMODEL_TIMEOUT_SCALE`` as a positive float (default 1)."""
    try:
        scale = float(os.environ.get("DEVMODEL_TIMEOUT_SCALE", "1"))
    except ValueError:
        raise ValueError("DEVMODEL_TIMEOUT_SCALE must be a number") from None
    return scale if scale > 0 else 1.0


class GuestError(RuntimeError):
    """The guest did not boot, a command timed out, or QEMU died; carries the console tail."""

    def __init__(self, message: str, console: str = "") -> None:
        tail = console[-3000:]
        super().__init__(f"{message}\n--- guest console (tail) ---\n{tail}" if tail else message)
        self.console = console


@dataclass
class GuestConfig:
    """How to boot: memory, backend, extra QEMU arguments, kernel command line."""

    memory_mb: int = 1024
    #: memory-backend-memfd with share=on lets vfio-user servers map guest RAM directly;
    #: None boots with plain RAM, so device DMA goes through DMA_READ/DMA_WRITE messages.
    memory_backend: str | None = "memory-backend-memfd"
    extra_args: list[str] = field(default_factory=list)
    append: str = ""
    accel: str | None = None
    boot_timeout: float = 60.0
    #: QMP UNIX socket path; None: ``qmp.sock`` in a private directory removed at close().
    qmp_socket: str | None = None
    modules: list[str] | None = None


class Guest:
    """A running guest. Use as a context manager; ``run`` commands, ``expect`` patterns."""

    def __init__(self, config: GuestConfig | None = None, **overrides: object) -> None:
        self.config = config or GuestConfig()
        for key, value in overrides.items():
            setattr(self.config, key, value)
        self.scale = timeout_scale()
        self._log = io.StringIO()
        self.child: pexpect.spawn | None = None
        self.boot_seconds: float | None = None
        #: Connected after start(); None before and after close().
        self.qmp: QemuMonitor | None = None
        self.qmp_path: str | None = self.config.qmp_socket
        self._qmp_dir: str | None = None  # the private directory we created (removed at close)
        self._busy = False  # a console command was sent and its end marker not yet seen

    # -- lifecycle -------------------------------------------------------------------
    def argv(self) -> list[str]:
        """The full QEMU command line for this configuration."""
        cfg = self.config
        kernel = find_kernel()
        initrd = build_initramfs(kernel, cfg.modules)
        accel = cfg.accel or choose_accel()
        machine = f"q35,accel={accel}"
        args = [*qemu_argv(), "-nodefaults", "-no-user-config", "-display", "none",
                "-m", f"{cfg.memory_mb}M", "-smp", "1",
                "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
                "-no-reboot", "-kernel", str(kernel.image), "-initrd", str(initrd),
                "-append", f"{DEFAULT_APPEND} {cfg.append}".strip()]
        if accel == "kvm":
            args += ["-cpu", "host"]
        if cfg.memory_backend:
            share = ",share=on" if cfg.memory_backend in ("memory-backend-memfd", "memory-backend-file") else ""
            args += ["-object", f"{cfg.memory_backend},id=mem,size={cfg.memory_mb}M{share}"]
            machine += ",memory-backend=mem"
        args += ["-machine", machine]
        if self.qmp_path:
            args += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        return args + list(cfg.extra_args)

    def start(self) -> "Guest":
        """Boot QEMU and wait for the ready marker; set up the console for ``run``."""
        if self.qmp_path is None:
            self._qmp_dir = temp_socket_dir()
            self.qmp_path = os.path.join(self._qmp_dir, QMP_SOCKET_NAME)
        try:
            argv = self.argv()
            log.info("starting guest: %s", shlex.join(argv))
            t0 = time.monotonic()
            self.child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace",
                                       timeout=None, echo=False, dimensions=(50, 250))
        except BaseException:
            self._release_qmp()  # nothing started: do not leave the socket directory behind
            raise
        self.child.logfile_read = self._log
        _LIVE.add(self)
        self._expect_or_fail(re.escape(READY_MARKER), self.config.boot_timeout, "guest did not boot")
        self.boot_seconds = time.monotonic() - t0
        # Echo off and no prompt, so outputs come back clean; split the marker so the echo
        # of this very line cannot match it.
        self.child.sendline("stty -echo; PS1=''; PS2=''; echo '@@SY''NC@@'")
        self._expect_or_fail("@@SYNC@@\r*\n", 10, "guest shell did not answer")
        log.info("guest ready in %.2f s", self.boot_seconds)
        # QEMU created the socket before running the guest, so it is there by now.
        self.qmp = QemuMonitor().connect(self.qmp_path, QMP_CONNECT_TIMEOUT * self.scale)
        return self

    def close(self, poweroff: bool = True) -> None:
        """Shut QEMU down, always: guest ``poweroff -f`` (skipped when ``poweroff`` is False
        or the shell is still running a command), then QMP ``quit`` if QEMU still runs, then
        kill as the last resort. The monitor is closed and the private socket dir removed."""
        child, self.child = self.child, None
        try:
            if child is not None:
                if poweroff and not self._busy:
                    self._poweroff(child)
                if child.isalive():
                    self._quit(child)
        finally:
            if child is not None:
                if child.isalive():
                    log.info("killing QEMU (pid %d)", child.pid)
                    child.terminate(force=True)
                child.close(force=True)
                _LIVE.discard(self)
            self._release_qmp()

    def _poweroff(self, child: pexpect.spawn) -> None:
        """The guest's own shutdown through its shell; QEMU exits with the guest."""
        try:
            if child.isalive():
                child.sendline("poweroff -f")
                child.expect(pexpect.EOF, timeout=POWEROFF_WAIT * self.scale)
        except (pexpect.TIMEOUT, pexpect.EOF, OSError):
            log.info("guest did not power off; asking QEMU to quit")

    def _quit(self, child: pexpect.spawn) -> None:
        """QMP ``quit``: QEMU exits whatever the guest is doing."""
        if self.qmp is None:
            return
        try:
            self.qmp.quit()
            child.expect(pexpect.EOF, timeout=QUIT_WAIT * self.scale)
        except (pexpect.TIMEOUT, pexpect.EOF, OSError, TimeoutError, RuntimeError) as exc:
            log.info("QMP quit did not end QEMU: %s", exc)

    def _release_qmp(self) -> None:
        monitor, self.qmp = self.qmp, None
        if monitor is not None:
            monitor.close()
        if self._qmp_dir is not None:
            shutil.rmtree(self._qmp_dir, ignore_errors=True)
            self._qmp_dir = None
            self.qmp_path = self.config.qmp_socket
        elif self.qmp_path and os.path.exists(self.qmp_path):
            try:  # a socket path the caller chose: QEMU may leave it behind
                os.unlink(self.qmp_path)
            except OSError:
                pass

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- console -------------------------------------------------------------------------
    @property
    def console(self) -> str:
        """Everything the guest printed so far (for logs and failure messages)."""
        return self._log.getvalue()

    def save_console(self, path: str | os.PathLike) -> None:
        """Write the console log to ``path``."""
        Path(path).write_text(self.console)

    def _expect_or_fail(self, pattern: str | list, timeout: float, what: str) -> int:
        assert self.child is not None, "guest not started"
        try:
            return self.child.expect(pattern, timeout=timeout * self.scale)
        except pexpect.TIMEOUT:
            raise GuestError(f"{what} within {timeout * self.scale:.0f} s", self.console) from None
        except pexpect.EOF:
            raise GuestError(f"{what}: QEMU exited (status {self.child.exitstatus}, "
                             f"signal {self.child.signalstatus})", self.console) from None

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command in the guest; return (exit code, output with \\n line ends)."""
        assert self.child is not None, "guest not started"
        self._busy = True
        self.child.sendline(f"{command}\necho \"@@RC=$?@@\"")
        self._expect_or_fail(RC_RE, timeout, f"command {command!r} did not finish")
        self._busy = False
        rc = int(self.child.match.group(1))
        return rc, self.child.before.replace("\r", "")

    def check(self, command: str, timeout: float = 30.0) -> str:
        """Run ``command`` and return its output; raise GuestError when it fails."""
        rc, out = self.run(command, timeout)
        if rc != 0:
            raise GuestError(f"guest command {command!r} exited {rc}:\n{out}", self.console)
        return out

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait for a regex on the console (e.g. a kernel message); return the match."""
        self._expect_or_fail(pattern, timeout, f"pattern {pattern!r} not seen")
        assert self.child is not None
        return self.child.match

    def write_file(self, path: str, data: bytes) -> None:
        """Create a file in the guest from host bytes (hex through the console)."""
        self.check(f": > {shlex.quote(path)}")
        for i in range(0, len(data), 1024):
            chunk = "".join(f"\\x{b:02x}" for b in data[i:i + 1024])
            self.check(f"printf '{chunk}' >> {shlex.quote(path)}")


@atexit.register
def _kill_leftovers() -> None:
    """Safety net: no QEMU outlives the Python process."""
    for guest in list(_LIVE):
        guest.close()


def temp_socket_dir() -> str:
    """A private directory for vfio-user and QMP sockets (short path: sun_path is 108 bytes)."""
    return tempfile.mkdtemp(prefix="devmodel-")


def parse_records(out: str) -> list[dict]:
    """The guest agent's ``kind key=value ...`` lines as dicts: the kind under ``"_"``,
    values that parse as integers (any base prefix) as ints, the rest as strings."""
    records = []
    for parts in map(shlex.split, out.splitlines()):
        if not parts:
            continue
        record: dict = {"_": parts[0]}
        for key, _, value in (p.partition("=") for p in parts[1:] if "=" in p):
            try:
                record[key] = int(value, 0)
            except ValueError:
                record[key] = value
        records.append(record)
    return records
