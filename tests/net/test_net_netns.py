"""NetNamespace lifecycle: setup state, teardown that leaves nothing, stale reaping, and
the reason given where namespaces/taps cannot be made.

Brief (issue 9, TAP backend): the namespace is named ``devmodel-<pid>-...``; the tap is
up with an IPv4 address (default 10.77.0.1/24) and IPv6 disabled; close() removes the
namespace and every link even after errors and is idempotent; atexit closes forgotten
namespaces; cleanup_stale() reaps namespaces whose creator is gone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2 import netns as pyroute2_netns

from devmodel.net import NetAdminUnavailable, NetNamespace, cleanup_stale, namespace_name, run_in_namespace
from devmodel.net.netns import NETNS_RUN_DIR, NamespaceName, process_start_time

from .conftest import needs_net_admin

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000  # linux/if.h: carrier (a tap has one while its fd is attached)


def thread_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def links_in(nsfd: int) -> list[str]:
    """Interface names in the namespace behind ``nsfd`` (seen from a thread inside it)."""
    out: list[list[str]] = []

    def body() -> None:
        pyroute2_netns.setns(nsfd)
        out.append([name for _, name in socket.if_nameindex()])

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out[0]


def host_temp_links() -> list[str]:
    """Host links with this process's temporary tap prefix (none may survive setup)."""
    prefix = f"dm{os.getpid()}t"
    with IPRoute() as ipr:
        return [name for link in ipr.get_links()
                if (name := link.get("IFLA_IFNAME")).startswith(prefix)]


def run_child(code: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def test_link_up_with_ipv4_address_and_no_ipv6(ns: NetNamespace) -> None:
    """Checked with an independent pyroute2 connection into the namespace."""
    assert ns.name.startswith(f"devmodel-{os.getpid()}-")
    assert ns.name in pyroute2_netns.listnetns()
    with IPRoute(netns=ns.name, flags=0) as ipr:
        link = ipr.get_links(ns.ifindex)[0]
        assert link.get("IFLA_IFNAME") == "tap0"
        assert link["flags"] & IFF_UP and link["flags"] & IFF_LOWER_UP
        (lo,) = ipr.get_links(ipr.link_lookup(ifname="lo")[0])
        assert lo["flags"] & IFF_UP
        v4 = [(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=socket.AF_INET, index=ns.ifindex)]
        assert v4 == [("10.77.0.1", 24)]
        assert list(ipr.get_addr(family=socket.AF_INET6, index=ns.ifindex)) == []
    flag = run_in_namespace(ns.name, lambda: open(f"/proc/sys/net/ipv6/conf/{ns.ifname}/disable_ipv6").read())
    assert flag.strip() == "1"
    assert ns.link_up()
    assert ns.ipv4_addresses() == [ipaddress.IPv4Interface("10.77.0.1/24")]
    assert len(ns.mac) == 6 and ns.mac[0] & 1 == 0  # a unicast MAC


def test_custom_ifname_and_address() -> None:
    needs_net_admin()
    with NetNamespace(ifname="wire1", address="192.168.77.2/30") as ns:
        assert ns.ipv4_addresses() == [ipaddress.IPv4Interface("192.168.77.2/30")]
        assert ns.backend.ifname == "wire1"  # TUNGETIFF sees the rename inside the namespace


def test_caller_thread_stays_in_its_namespace(ns: NetNamespace) -> None:
    """packet_socket()/run_in_namespace enter the namespace in a short-lived thread only."""
    before = thread_netns()
    inside = run_in_namespace(ns.name, thread_netns)
    ns.packet_socket().close()
    assert inside != before
    assert thread_netns() == before


def test_close_leaves_no_namespace_or_link_and_is_idempotent() -> None:
    needs_net_admin()
    ns = NetNamespace()
    ns.open()
    # Keep the namespace object alive past close() to look inside it afterwards.
    nsfd = os.open(os.path.join(NETNS_RUN_DIR, ns.name), os.O_RDONLY)
    try:
        assert "tap0" in links_in(nsfd)
        ns.close()
        assert ns.name not in pyroute2_netns.listnetns()
        assert links_in(nsfd) == ["lo"]
        assert host_temp_links() == []
        ns.close()  # harmless second call
        assert ns.backend.fileno() == -1
    finally:
        os.close(nsfd)


def test_failed_setup_is_undone() -> None:
    """A rename the kernel refuses ('/' in a name) fails open(); nothing is left behind."""
    needs_net_admin()
    before = set(pyroute2_netns.listnetns())
    ns = NetNamespace(ifname="bad/name")
    with pytest.raises(NetlinkError):  # EINVAL from the move-and-rename request
        ns.open()
    assert set(pyroute2_netns.listnetns()) - before == set()
    assert ns.name not in pyroute2_netns.listnetns()
    assert host_temp_links() == []
    ns.close()


def test_cleanup_stale_removes_dead_creator_keeps_live_one() -> None:
    """Names encode pid and start time: dead pid -> reaped; live pid -> kept; a reused
    pid (same pid, other start time) counts as dead."""
    needs_net_admin()
    child = subprocess.Popen(["sleep", "0"])
    dead = NamespaceName(child.pid, process_start_time(child.pid) or 0, 0)
    child.wait()
    live = namespace_name(os.getpid(), 10**9)
    reused = str(NamespaceName(os.getpid(), process_start_time(os.getpid()) + 1, 10**9 + 1))
    names = [str(dead), live, reused]
    for name in names:
        pyroute2_netns.create(name)
    try:
        removed = cleanup_stale()
        assert str(dead) in removed and reused in removed
        assert live not in removed
        present = pyroute2_netns.listnetns()
        assert str(dead) not in present and reused not in present
        assert live in present
    finally:
        for name in names:
            if name in pyroute2_netns.listnetns():
                pyroute2_netns.remove(name)


def test_cleanup_stale_ignores_foreign_names() -> None:
    needs_net_admin()
    name = f"devmodel-notours-{os.getpid()}"
    pyroute2_netns.create(name)
    try:
        assert name not in cleanup_stale()
        assert name in pyroute2_netns.listnetns()
    finally:
        pyroute2_netns.remove(name)


def test_atexit_closes_a_forgotten_namespace() -> None:
    needs_net_admin()
    child = run_child("""
        from devmodel.net import NetNamespace
        ns = NetNamespace()
        ns.open()
        print(ns.name)
    """)
    assert child.returncode == 0, child.stderr
    name = child.stdout.strip()
    assert name.startswith("devmodel-")
    assert name not in pyroute2_netns.listnetns()


def test_atexit_hook_of_a_forked_child_leaves_the_parents_namespace() -> None:
    """pyroute2 forks to create namespaces; a child that exits through the interpreter runs
    the inherited atexit hooks, which must not remove the namespace the parent owns."""
    needs_net_admin()
    child = run_child("""
        import atexit, os
        from pyroute2 import netns
        from devmodel.net import NetNamespace
        ns = NetNamespace()
        ns.open()
        pid = os.fork()
        if pid == 0:
            atexit._run_exitfuncs()  # what an interpreter exit of the child would do
            os._exit(0)
        os.waitpid(pid, 0)
        print(ns.name in netns.listnetns())
        ns.close()
    """)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "True"


def test_killed_creator_is_reaped_by_cleanup_stale() -> None:
    """SIGKILL skips atexit: the namespace survives until cleanup_stale() sees the dead pid."""
    needs_net_admin()
    code = textwrap.dedent("""
        import sys, time
        from devmodel.net import NetNamespace
        ns = NetNamespace()
        ns.open()
        print(ns.name, flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        name = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert name in pyroute2_netns.listnetns()
    assert name in cleanup_stale()
    assert name not in pyroute2_netns.listnetns()


DROP_NET_ADMIN = """
    import ctypes, errno, json
    CAP_NET_ADMIN = 12
    LINUX_CAPABILITY_VERSION_3 = 0x20080522

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0
    data[0].effective &= ~(1 << CAP_NET_ADMIN)
    data[0].permitted &= ~(1 << CAP_NET_ADMIN)
    assert libc.capset(ctypes.byref(header), data) == 0

    from pyroute2 import netns
    from devmodel.net import NetAdminUnavailable, NetNamespace, TapBackend, net_admin_unavailable
    result = {"reason": net_admin_unavailable(), "before": sorted(netns.listnetns())}
    try:
        NetNamespace().open()
    except NetAdminUnavailable as exc:
        result["raised"] = str(exc)
    try:
        TapBackend("dmnocap").close()
    except OSError as exc:
        result["tap_errno"] = exc.errno
    result["after"] = sorted(netns.listnetns())
    print(json.dumps(result))
"""


def test_reason_without_cap_net_admin() -> None:
    """A child that drops CAP_NET_ADMIN (capset) gets a clear reason; the kernel agrees
    (TUNSETIFF fails with EPERM), and NetNamespace raises before creating anything."""
    needs_net_admin()
    child = run_child(DROP_NET_ADMIN)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    assert "CAP_NET_ADMIN" in result["reason"]
    assert result["raised"] == result["reason"]
    assert result["tap_errno"] == 1  # EPERM
    assert result["after"] == result["before"]


def test_reason_without_tun_device(tmp_path) -> None:
    missing = str(tmp_path / "tun")
    ns = NetNamespace(tun_path=missing)
    with pytest.raises(NetAdminUnavailable, match="no tun/tap device") as info:
        ns.open()
    assert isinstance(info.value, OSError)
    assert ns.name == ""  # refused before a namespace was made
    ns.close()


def test_reason_without_pyroute2() -> None:
    child = run_child("""
        import sys
        sys.modules["pyroute2"] = None  # import of pyroute2 now fails
        from devmodel.net import net_admin_unavailable
        print(net_admin_unavailable())
    """)
    assert child.returncode == 0, child.stderr
    assert "pyroute2" in child.stdout
