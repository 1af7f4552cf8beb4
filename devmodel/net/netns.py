"""A throw-away network namespace holding one tap, the NIC model's far end of the wire.

The tap's descriptor stays with the model (a :class:`~devmodel.net.tap.TapBackend`); the
interface itself lives in a private namespace so tests and demos can address it, capture
on it and inject through it without touching the host's own networking. Every netlink
operation goes through pyroute2; the namespace is entered only by short-lived threads
(``setns`` affects the calling thread alone), so the caller's thread never leaves its
namespace.

Traffic must be deterministic: IPv6 is disabled in the namespace before the tap arrives,
so the kernel sends no DAD, MLD or router solicitations, and IPv4 sends nothing unasked
(no gratuitous ARP by default).

Names are ``devmodel-<pid>-<start>-<seq>``: the creator's pid and its start time (clock
ticks since boot, /proc/<pid>/stat field 22) tell :func:`cleanup_stale` whether the
creator is gone even after the pid was reused.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from devmodel.net.tap import TUN_PATH, TapBackend

try:
    from pyroute2 import IPRoute
    from pyroute2 import netns as pyroute2_netns
except ImportError:  # reported by net_admin_unavailable()
    IPRoute = None
    pyroute2_netns = None

log = logging.getLogger(__name__)

PREFIX = "devmodel-"
"""Every namespace this module creates is named with this prefix (and only those are reaped)."""

NETNS_RUN_DIR = "/var/run/netns"
"""Where named namespaces are bind-mounted (the iproute2 / pyroute2 convention)."""

DEFAULT_IFNAME = "tap0"
DEFAULT_ADDRESS = "10.77.0.1/24"

ETH_P_ALL = 0x0003
"""linux/if_ether.h: every protocol, for capture sockets."""

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
"""linux/capability.h bit numbers: links/addresses need NET_ADMIN; unshare, mount and
setns of a network namespace need SYS_ADMIN."""

IFF_UP = 0x1
"""linux/if.h: administratively up."""

CAPTURE_RCVBUF = 1 << 20
"""Capture sockets' receive buffer: a test burst must not overflow the default ~200 KiB."""

SO_RCVBUFFORCE = 33
"""asm-generic/socket.h: set the receive buffer past rmem_max (CAP_NET_ADMIN); the
socket module of older Pythons lacks the name."""

T = TypeVar("T")


class NetAdminUnavailable(OSError):
    """Namespaces or taps cannot be made here; the message says why."""


@dataclass(frozen=True)
class NamespaceName:
    """The fields encoded in a namespace name."""

    pid: int
    start: int
    seq: int

    def __str__(self) -> str:
        return f"{PREFIX}{self.pid}-{self.start}-{self.seq}"

    @classmethod
    def parse(cls, name: str) -> NamespaceName | None:
        """The fields of a name this module made, None for any other name."""
        if not name.startswith(PREFIX):
            return None
        parts = name[len(PREFIX):].split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        return cls(*(int(p) for p in parts))


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, None when no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)


def namespace_name(pid: int, seq: int) -> str:
    """The name a namespace created by live process ``pid`` gets (``seq`` makes it unique)."""
    start = process_start_time(pid)
    if start is None:
        raise ProcessLookupError(pid, "no such process")
    return str(NamespaceName(pid, start, seq))


def creator_alive(parsed: NamespaceName) -> bool:
    """True while the process that made the namespace still runs (pid reuse excluded)."""
    return process_start_time(parsed.pid) == parsed.start


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def net_admin_unavailable(tun_path: str = TUN_PATH) -> str | None:
    """None when a namespace and a tap can be made here, else the reason they cannot."""
    if IPRoute is None:
        return "pyroute2 is not installed (needed for every netlink operation)"
    caps = _effective_caps()
    if not caps & (1 << CAP_NET_ADMIN):
        return "no CAP_NET_ADMIN in the effective capability set (needed to create taps and configure links)"
    if not caps & (1 << CAP_SYS_ADMIN):
        return "no CAP_SYS_ADMIN in the effective capability set (needed to create and enter network namespaces)"
    if not os.path.exists("/proc/self/ns/net"):
        return "the kernel has no network namespaces (/proc/self/ns/net missing)"
    try:
        mode = os.stat(tun_path).st_mode
    except OSError as exc:
        return f"no tun/tap device at {tun_path}: {exc.strerror}"
    if not stat.S_ISCHR(mode):
        return f"{tun_path} is not a character device"
    if not os.access(tun_path, os.R_OK | os.W_OK):
        return f"{tun_path} is not readable and writable"
    return None


def run_in_namespace(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that entered namespace ``name``; return its result.

    ``setns(CLONE_NEWNET)`` changes only the calling thread, and the thread ends right
    after, so no thread of this process is left in the namespace. Sockets made by ``fn``
    stay bound to the namespace they were created in.
    """
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                pyroute2_netns.setns(fd)
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _disable_ipv6(ifnames: tuple[str, ...]) -> None:
    """Set disable_ipv6 on ``ifnames`` (run inside the namespace: /proc/sys/net is per netns)."""
    base = "/proc/sys/net/ipv6/conf"
    if not os.path.isdir(base):
        return  # kernel without IPv6: nothing to silence
    for ifname in ifnames:
        _write_sysctl(f"{base}/{ifname}/disable_ipv6", "1")


def remove_namespace(name: str) -> None:
    """Unmount and delete namespace ``name`` (pyroute2); a missing one is not an error."""
    if name not in pyroute2_netns.listnetns():
        return
    pyroute2_netns.remove(name)
    log.info("namespace %s removed", name)


def cleanup_stale() -> list[str]:
    """Remove every ``devmodel-`` namespace whose creator process is gone; return their names.

    Taps need no reaping: a crashed creator's descriptors closed with it, and a
    non-persistent tap dies with its last descriptor.
    """
    if pyroute2_netns is None:
        return []
    removed = []
    for name in sorted(pyroute2_netns.listnetns()):
        parsed = NamespaceName.parse(name)
        if parsed is None or creator_alive(parsed):
            continue
        try:
            remove_namespace(name)
        except OSError as exc:
            log.warning("stale namespace %s not removed: %s", name, exc)
            continue
        removed.append(name)
    return removed


_LIVE: set[NetNamespace] = set()
_LIVE_LOCK = threading.Lock()
_SEQ = itertools.count()


_OWNER_PID = os.getpid()


@atexit.register
def _close_all() -> None:
    """Interpreter exit: close every namespace a test or demo forgot (or crashed past).

    Only in the process that made them: a forked child (pyroute2 forks to create a
    namespace) inherits this hook, and if it ever exits through the interpreter it must
    not remove the namespace its parent is still setting up."""
    if os.getpid() != _OWNER_PID:
        return
    with _LIVE_LOCK:
        live = list(_LIVE)
    for ns in live:
        ns.close()


class NetNamespace:
    """A private namespace with one tap (link and lo up, IPv4 address, IPv6 off).

    ``with NetNamespace() as ns:`` opens it and yields the namespace; ``ns.backend`` is the
    :class:`TapBackend` to give the NIC model, ``ns.packet_socket()`` the far end for
    tests. :meth:`close` (idempotent, also at interpreter exit) closes the tap, deletes any
    link still in the namespace and removes the namespace.
    """

    def __init__(self, *, ifname: str = DEFAULT_IFNAME, address: str = DEFAULT_ADDRESS,
                 tun_path: str = TUN_PATH) -> None:
        self.ifname = ifname
        self.address = ipaddress.IPv4Interface(address)
        self.tun_path = tun_path
        self.name = ""
        self.backend: TapBackend | None = None
        self.ifindex = 0
        self._host_ifname = ""
        self._ipr: IPRoute | None = None
        self._closed = False

    # -- setup -------------------------------------------------------------------------

    def open(self) -> TapBackend:
        """Create the namespace and the tap; return the tap's backend. Undone on failure."""
        reason = net_admin_unavailable(self.tun_path)
        if reason is not None:
            raise NetAdminUnavailable(reason)
        if self.name:
            raise RuntimeError(f"namespace {self.name} already opened")
        cleanup_stale()
        self.name = namespace_name(os.getpid(), next(_SEQ))
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._create_namespace()
            self._create_tap()
            self._move_tap()
            self._configure()
        except BaseException:
            log.exception("namespace %s setup failed; undoing", self.name)
            self.close()
            raise
        log.info("namespace %s ready: %s index %d %s", self.name, self.ifname, self.ifindex, self.address)
        return self.backend

    def _create_namespace(self) -> None:
        pyroute2_netns.create(self.name)
        log.info("namespace %s created", self.name)
        # Before any interface moves in: "default" seeds newcomers, "all" covers lo.
        run_in_namespace(self.name, lambda: _disable_ipv6(("all", "default")))
        self._ipr = IPRoute(netns=self.name, flags=0)

    def _create_tap(self) -> None:
        # A temporary host-side name unique to this process and namespace, at most 15 bytes.
        seq = NamespaceName.parse(self.name).seq
        self._host_ifname = f"dm{os.getpid()}t{seq}"[:15]
        self.backend = TapBackend(self._host_ifname, tun_path=self.tun_path)
        self._host_ifname = self.backend.ifname

    def _move_tap(self) -> None:
        with IPRoute() as host:
            (index,) = host.link_lookup(ifname=self._host_ifname)
            host.link("set", index=index, net_ns_fd=self.name, ifname=self.ifname)
        log.info("tap %s moved into %s as %s", self._host_ifname, self.name, self.ifname)
        self._host_ifname = ""

    def _configure(self) -> None:
        ipr = self._ipr
        (self.ifindex,) = ipr.link_lookup(ifname=self.ifname)
        run_in_namespace(self.name, lambda: _disable_ipv6((self.ifname,)))
        ipr.addr("add", index=self.ifindex, address=str(self.address.ip),
                 prefixlen=self.address.network.prefixlen)
        ipr.link("set", index=self.ifindex, state="up")
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=lo, state="up")

    # -- queries -----------------------------------------------------------------------

    @property
    def mac(self) -> bytes:
        """The tap interface's MAC address inside the namespace (the wire's far end)."""
        link = self._ipr.get_links(self.ifindex)[0]
        return bytes.fromhex(link.get("IFLA_ADDRESS").replace(":", ""))

    def link_up(self) -> bool:
        """True when the tap interface is administratively up inside the namespace."""
        return bool(self._ipr.get_links(self.ifindex)[0]["flags"] & IFF_UP)

    def ipv4_addresses(self) -> list[ipaddress.IPv4Interface]:
        """The IPv4 addresses on the tap inside the namespace."""
        return [ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                for a in self._ipr.get_addr(family=socket.AF_INET, index=self.ifindex)]

    def packet_socket(self, ifname: str | None = None, *, protocol: int = ETH_P_ALL,
                      rcvbuf: int = CAPTURE_RCVBUF) -> socket.socket:
        """An AF_PACKET/SOCK_RAW socket bound to ``ifname`` (default the tap) in the namespace.

        It sends frames out of that interface (into the tap: the model receives them) and
        captures every frame crossing it (the ones the model sends arrive as received).
        """
        target = ifname or self.ifname

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                sock.bind((target, protocol))
            except BaseException:
                sock.close()
                raise
            return sock

        return run_in_namespace(self.name, make)

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the tap, delete links left in the namespace, remove the namespace.

        Every step runs even when an earlier one failed (errors are logged), and a second
        call does nothing.
        """
        if self._closed:
            return
        self._closed = True
        for step in (self._close_backend, self._delete_links, self._close_ipr,
                     self._delete_host_tap, self._remove_namespace):
            try:
                step()
            except Exception:
                log.exception("namespace %s teardown step %s failed", self.name, step.__name__)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _close_backend(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def _delete_links(self) -> None:
        """A non-persistent tap died with its fd; delete it anyway if something kept it."""
        if self._ipr is None:
            return
        for index in self._ipr.link_lookup(ifname=self.ifname):
            self._ipr.link("del", index=index)
            log.info("link %s deleted from %s", self.ifname, self.name)

    def _close_ipr(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    def _delete_host_tap(self) -> None:
        """Setup failed between creating the tap and moving it: delete it on the host."""
        if not self._host_ifname:
            return
        with IPRoute() as host:
            for index in host.link_lookup(ifname=self._host_ifname):
                host.link("del", index=index)
                log.info("host link %s deleted", self._host_ifname)
        self._host_ifname = ""

    def _remove_namespace(self) -> None:
        if self.name:
            remove_namespace(self.name)

    def __enter__(self) -> NetNamespace:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetNamespace({self.name or 'unopened'}, {self.ifname}, {self.address})"
