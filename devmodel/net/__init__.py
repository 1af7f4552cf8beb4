"""The NIC model's wire: a TAP packet backend living in a private network namespace.

* :class:`TapBackend` -- a tap descriptor as a ``PacketBackend`` (fileno/recv/send/close).
* :class:`NetNamespace` -- a throw-away namespace holding that tap (IPv4 address, IPv6
  off, link up), plus ``packet_socket()`` for the far end and ``close()`` that leaves
  nothing behind.
* :func:`net_admin_unavailable` -- why namespaces/taps cannot be made here (None if they can).
* :func:`cleanup_stale` -- reap ``devmodel-`` namespaces of processes that are gone.
"""

from devmodel.net.netns import (DEFAULT_ADDRESS, DEFAULT_IFNAME, NetAdminUnavailable, NetNamespace,
                                cleanup_stale, namespace_name, net_admin_unavailable,
                                run_in_namespace)
from devmodel.net.tap import TUN_PATH, TapBackend

__all__ = [
    "DEFAULT_ADDRESS", "DEFAULT_IFNAME", "NetAdminUnavailable", "NetNamespace", "TUN_PATH",
    "TapBackend", "cleanup_stale", "namespace_name", "net_admin_unavailable", "run_in_namespace",
]
