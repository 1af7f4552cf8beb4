"""``devmodel run``: serve the device models, boot the guest in the bundled QEMU, attach them.

The order matters (see the project's vfio-user notes): the vfio-user server listens first
(QEMU exits with "Connection refused" otherwise and never reconnects), guest RAM is a
shared memfd backend (with share=off device DMA silently never reaches the guest), and
every device is attached with the JSON form of ``-device`` (from
:func:`devmodel.commands.serve.qemu_device_json`, which device factories can influence).

Two modes:

* interactive (no ``--exec``): the guest console is handed to the terminal. ``poweroff``
  in the guest, Ctrl-] or Ctrl-C end the session (Ctrl-C ends it like QEMU's own stdio
  console does; it does not interrupt a guest command).
* ``--exec CMD`` (repeatable): each command runs in the guest shell, its output is
  printed, and the exit status is the guest status of the last command that ran. Without
  ``--keep-going`` the run stops at the first failing command (so that command's status
  is returned); with ``--keep-going`` every command runs and the status of the FIRST
  failing one is returned (0 when all succeeded).

Exit statuses of the tool itself: 2 bad options, 124 a guest command timed out,
125 the machine could not be started (no QEMU, guest did not boot, QEMU died).

QEMU gets a QMP socket (``qmp.sock`` next to the control socket; both paths are printed).
While the guest runs, the control socket offers ``qemu.plug``, ``qemu.unplug`` and
``qemu.query`` (:func:`devmodel.qmp.register_qmp_commands`; ``devmodel qemu ...`` is their
command line), so a served device can be hot-unplugged and plugged again.

QEMU and the server are always torn down: QEMU is told to quit over QMP (killed if it
lingers: the guest shell may be busy, so no guest poweroff is attempted), the server stops
and removes its sockets, and the private socket directory is deleted, on success, failure,
Ctrl-C and SIGTERM alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

from devmodel.commands.serve import (DEFAULT_DEVICE, ServedDevice, add_backend_option, add_nic_netns_option, control_path,
                                     create_served, nic_network, qemu_device_args, serving)

if TYPE_CHECKING:
    from guest.harness import Guest

log = logging.getLogger(__name__)

#: Guest RAM default (MiB): the agent's reserved window [512 MiB, +16 MiB) must fit.
DEFAULT_MEMORY_MB = 1024
MIN_MEMORY_MB = 64
DEFAULT_TIMEOUT = 60.0
DEFAULT_BOOT_TIMEOUT = 60.0
QMP_SOCKET_NAME = "qmp.sock"
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_MACHINE = 125
#: Ctrl-] (telnet's escape) ends an interactive session; Ctrl-C is mapped onto it.
ESCAPE_CHAR = "\x1d"
CTRL_C = b"\x03"
_SIZE_RE = re.compile(r"^(\d+)([MmGg]?)$")


def parse_memory(text: str) -> int:
    """``--memory`` as MiB: ``1024``, ``512M`` or ``1G``."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (use e.g. 1024, 512M, 1G)")
    mib = int(m.group(1)) * (1024 if m.group(2) in ("G", "g") else 1)
    if mib < MIN_MEMORY_MB:
        raise argparse.ArgumentTypeError(f"memory {mib} MiB is below {MIN_MEMORY_MB} MiB")
    return mib


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number of seconds {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("seconds must be positive")
    return value


@contextmanager
def machine(devices: list[str], *, accel: str | None = None, memory_mb: int = DEFAULT_MEMORY_MB,
            qemu_args: list[str] | None = None, boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
            append: str = "", backend: str = "python",
            nic_netns: bool = False) -> Iterator[tuple["Guest", list[ServedDevice]]]:
    """Serve ``devices`` on sockets in a private directory and boot a guest attached to them.

    Yields (booted guest, served devices); ``guest.qmp`` is connected to QEMU's QMP socket
    (``guest.qmp_path``, in the same directory) and the control socket has the ``qemu.*``
    commands. On exit QEMU is told to quit over QMP (killed if it lingers), the server
    stopped and the socket directory removed. ``nic_netns``: cable the machine's NIC to a tap
    in a private network namespace (serve.nic_network) while it runs. ValueError for an unknown device name;
    :class:`guest.harness.GuestError` / :class:`images.qemu.QemuError` when the machine
    does not come up.
    """
    from devmodel.qmp import register_qmp_commands
    from guest.harness import Guest, GuestConfig, temp_socket_dir

    sock_dir = temp_socket_dir()
    try:
        served = create_served(devices, None, sock_dir, ram_mb=memory_mb)
        # The namespace first: pyroute2 forks to create it, which is only safe before the
        # server's threads exist (a lock held by one of them would hang the child).
        with nic_network(served, nic_netns), serving(served, backend) as running:
            config = GuestConfig(memory_mb=memory_mb, memory_backend="memory-backend-memfd",
                                 extra_args=qemu_device_args(served) + list(qemu_args or []),
                                 accel=accel, boot_timeout=boot_timeout, append=append,
                                 qmp_socket=os.path.join(sock_dir, QMP_SOCKET_NAME))
            guest = Guest(config)
            try:
                guest.start()
                assert guest.qmp is not None
                register_qmp_commands(running.control, guest.qmp, served)
                yield guest, served
            finally:
                # Whatever ended the run (done, interrupted, timed out), the guest shell may
                # be busy, so a guest poweroff could only wait: QEMU quits through QMP.
                guest.close(poweroff=False)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


class CommandTimeout(RuntimeError):
    """A guest command did not finish in time (QEMU still running)."""


def run_commands(guest: "Guest", commands: list[str], timeout: float, keep_going: bool,
                 out=sys.stdout) -> int:
    """Run each command in the guest, print its output; the exit status rule is in the module doc.

    CommandTimeout when a command overruns; GuestError when QEMU went away.
    """
    from guest.harness import GuestError

    first_failure = 0
    status = 0
    for command in commands:
        try:
            # A subshell, so `exit N` or `set -e` ends the command, not the console shell.
            status, output = guest.run(f"(\n{command}\n)", timeout=timeout)
        except GuestError as exc:
            if guest.child is not None and guest.child.isalive():
                raise CommandTimeout(str(exc)) from None
            raise
        out.write(output)
        out.flush()
        log.info("guest command %r exited %d", command, status)
        if status and not first_failure:
            first_failure = status
            if not keep_going:
                return status
    return first_failure if keep_going else status


def interact(guest: "Guest") -> int:
    """Hand the guest console to this terminal until poweroff, Ctrl-] or Ctrl-C."""
    child = guest.child
    assert child is not None
    # The harness set the console up for machines (no echo, no prompt): undo that.
    child.sendline("stty sane; PS1='guest# '")
    print("devmodel run: guest console attached; `poweroff` in the guest, Ctrl-] or Ctrl-C ends "
          "the session.", file=sys.stderr, flush=True)
    child.interact(escape_character=ESCAPE_CHAR,
                   input_filter=lambda data: data.replace(CTRL_C, ESCAPE_CHAR.encode()))
    return 0


_MAIN_PID = os.getpid()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM takes the same teardown path as Ctrl-C, in this process only: a forked
    helper child (pyroute2 forks to make the NIC's namespace, then stops it with SIGTERM)
    inherits the handler and must just end, not unwind into our teardown."""
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Entry point of ``devmodel run``."""
    from guest.harness import GuestError
    from images.qemu import QemuError
    import pexpect
    from vfio_user.backend import BackendUnavailable

    interactive = not args.exec
    if interactive and not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("devmodel run: the interactive console needs a terminal; use --exec CMD", file=sys.stderr)
        return EXIT_USAGE
    qemu_args: list[str] = []
    for raw in args.qemu_arg or []:
        qemu_args += shlex.split(raw)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with machine(args.device or [DEFAULT_DEVICE], accel=args.accel, memory_mb=args.memory,
                     qemu_args=qemu_args, boot_timeout=args.boot_timeout,
                     append=args.append or "", backend=args.backend,
                     nic_netns=args.nic_netns) as (guest, served):
            print(f"devmodel run: control socket {control_path(served)}", file=sys.stderr, flush=True)
            print(f"devmodel run: QMP socket {guest.qmp_path}", file=sys.stderr, flush=True)
            if interactive:
                return interact(guest)
            return run_commands(guest, args.exec, args.timeout, args.keep_going)
    except (ValueError, BackendUnavailable) as exc:  # unknown device name, missing library
        print(f"devmodel run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandTimeout as exc:
        print(f"devmodel run: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except GuestError as exc:
        print(f"devmodel run: {exc}", file=sys.stderr)
        return EXIT_MACHINE
    except (QemuError, pexpect.ExceptionPexpect, OSError) as exc:
        print(f"devmodel run: cannot start the machine: {exc}", file=sys.stderr)
        return EXIT_MACHINE
    finally:
        signal.signal(signal.SIGTERM, previous)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="boot the guest in QEMU with the device models attached",
        description="Serve device models over vfio-user, boot the tiny guest in the bundled "
                    "QEMU with them attached, and either hand over the guest console or run "
                    "--exec commands in it.",
        epilog="Exit status with --exec: the guest status of the last command run (the first "
               "failing one stops the run unless --keep-going; with --keep-going the first "
               f"failing status). {EXIT_TIMEOUT}: a command timed out; {EXIT_MACHINE}: the "
               "machine did not start.")
    parser.add_argument("--device", action="append", metavar="NAME",
                        help=f"device model from devmodel.devices (repeatable; default {DEFAULT_DEVICE})")
    add_backend_option(parser)
    add_nic_netns_option(parser)
    parser.add_argument("--exec", action="append", metavar="CMD",
                        help="run CMD in the guest shell and print its output (repeatable)")
    parser.add_argument("--keep-going", action="store_true",
                        help="with --exec: run every command even after one fails")
    parser.add_argument("--accel", choices=("kvm", "tcg"),
                        help="QEMU accelerator (default: KVM only when it really works)")
    parser.add_argument("--memory", type=parse_memory, default=DEFAULT_MEMORY_MB, metavar="SIZE",
                        help=f"guest RAM: MiB, or with an M/G suffix (default {DEFAULT_MEMORY_MB})")
    parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"per --exec command (default {DEFAULT_TIMEOUT:.0f})")
    parser.add_argument("--boot-timeout", type=positive_seconds, default=DEFAULT_BOOT_TIMEOUT,
                        metavar="SECONDS", help=f"until the guest is ready (default {DEFAULT_BOOT_TIMEOUT:.0f})")
    parser.add_argument("--qemu-arg", action="append", metavar="ARGS",
                        help="extra QEMU arguments, split like a shell would (repeatable), "
                             "e.g. --qemu-arg='-smp 2'")
    parser.add_argument("--append", metavar="TEXT", help="extra guest kernel command line")
    parser.set_defaults(func=run)

