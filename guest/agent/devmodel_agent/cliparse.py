"""The ``dm`` command line, declared once for the client (help, early errors) and the daemon.

Kept free of project imports so the thin client starts fast in the guest.
"""

from __future__ import annotations

import argparse
import errno


class ParseError(Exception):
    """A bad command line inside the daemon (argparse would otherwise exit the process)."""

    code = errno.EINVAL


class RaisingParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting: the daemon must survive any client input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ParseError(message)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise ParseError(message or f"exit {status}")


def anyint(text: str) -> int:
    """Integers in any base Python accepts (0x.., 0o.., decimal)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def ssid_arg(text: str) -> int | None:
    return None if text.lower() in ("none", "-") else anyint(text)


def _wait_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=int, default=0, help="only records with seq > SINCE")
    p.add_argument("--wait", type=int, default=0, metavar="N", help="wait until N records (after SINCE) exist")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")


def _dev_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dev", choices=("engine", "nic"), default="engine",
                   help="which endpoint's capability (default: the DMA engine)")


def _nic_parsers(sub, parser_class: type[argparse.ArgumentParser]) -> None:
    """``dm nic ...``: rings, frames, the driver-unmapped-buffer scenario, counters."""
    nic = sub.add_parser("nic", help="the NIC: rings, frames, counters")
    nsub = nic.add_subparsers(dest="nic_cmd", required=True, parser_class=parser_class)
    n = nsub.add_parser("up", help="map rings, post RX buffers, enable RX and TX")
    n.add_argument("--rx-log2", type=int, default=4)
    n.add_argument("--tx-log2", type=int, default=4)
    n.add_argument("--buffers", type=int, default=8, help="RX buffers posted (< RX ring entries)")
    n.add_argument("--buf-size", type=anyint, default=2048)
    n.add_argument("--pasid", type=anyint, default=0, help="ring PASID (0: untagged, CD 0)")
    n = nsub.add_parser("send", help="transmit frame(s) and wait for their write-back")
    n.add_argument("hex", nargs="?", help="the frame bytes in hex")
    n.add_argument("--len", type=anyint, help="generated frame length (with --seed)")
    n.add_argument("--seed", type=anyint, default=0)
    n.add_argument("--count", type=int, default=1, help="frames (seed, seed+1, ... when generated)")
    n.add_argument("--timeout", type=float, default=5.0)
    n = nsub.add_parser("recv", help="frames the RX interrupt handler saw")
    _wait_opts(n)
    n = nsub.add_parser("unmap-rx", help="unmap the next N posted, unfilled RX buffers (+ TLBI)")
    n.add_argument("--count", type=int, default=1)
    nsub.add_parser("remap-rx", help="map unmapped RX buffers back and re-post them")
    nsub.add_parser("counters", help="the NIC's counter registers")
    nsub.add_parser("status", help="ring registers, link, error/link interrupts seen")
    nsub.add_parser("restart", help="clear and set the ring enables (resume a halted ring)")
    nsub.add_parser("down", help="disable RX/TX and unmap rings and buffers")


def up_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cmdq-log2", type=int, default=8)
    p.add_argument("--evtq-log2", type=int, default=8)
    p.add_argument("--priq-log2", type=int, default=8)
    p.add_argument("--ring-log2", type=int, default=6)
    p.add_argument("--sid-bits", type=int, default=9, help="stream table size (9: bus 0 and bus 1 vSIDs)")
    p.add_argument("--smmu", metavar="BDF", help="vIOMMU function (default: found by vendor/device/class)")
    p.add_argument("--engine", metavar="BDF", help="DMA engine function (default: found by id)")
    p.add_argument("--nic", metavar="BDF", help="NIC function (default: found by id)")
    p.add_argument("--log", default="/tmp/dm.log", help="daemon log file")
    p.add_argument("--verbose", action="store_true", help="debug logging in the daemon log")


def build(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The whole command tree. Every subcommand prints ``kind key=value ...`` lines."""
    top = parser_class(prog="dm", description="devmodel guest agent: drive the vIOMMU, the DMA engine and the NIC. "
                       "Output: one record per line, 'kind key=value ...'; addresses and IDs in hex.")
    top.add_argument("--socket", help="agent socket (default $DM_SOCKET or /run/dm.sock)")
    sub = top.add_subparsers(dest="cmd", required=True, parser_class=parser_class)

    up = sub.add_parser("up", help="start the agent daemon and bring the vIOMMU and DMA engine up")
    up_options(up)
    daemon = sub.add_parser("daemon", help="run the agent in the foreground (what 'up' starts)")
    up_options(daemon)
    sub.add_parser("down", help="disable the devices and stop the daemon")
    sub.add_parser("status", help="registers, engine state, capabilities")
    sub.add_parser("counters", help="interrupt and queue counters")
    sub.add_parser("gerror", help="global-error log and GERROR/GERRORN")

    ste = sub.add_parser("ste", help="write a stream table entry (+ CFGI_STE, CMD_SYNC)")
    ste.add_argument("vsid", type=anyint)
    ste.add_argument("mode", choices=("s1", "abort", "bypass", "bad", "invalid"))
    ste.add_argument("--new-cd", action="store_true", help="s1 with a fresh CD table (STE replace)")
    ste.add_argument("--eats", choices=("auto", "on", "off"), default="auto",
                     help="STE.EATS (auto: on when the engine has ATS enabled)")
    ste.add_argument("--pending", choices=("invalid", "keep"), default="invalid",
                     help="answer page-request groups outstanding for this SID (default invalid)")

    mp = sub.add_parser("map", help="map IOVA page(s) of a PASID (0 = untagged, CD 0)")
    mp.add_argument("pasid", type=anyint)
    mp.add_argument("iova", type=anyint)
    mp.add_argument("--ro", action="store_true", help="read-only (AP[2]=1)")
    mp.add_argument("--page-for-buffer", metavar="NAME", help="map the buffer's pages instead of fresh ones")
    mp.add_argument("--buffer-offset", type=anyint, default=0)
    mp.add_argument("--pages", type=int, default=1)
    mp.add_argument("--sid", type=anyint, help="StreamID (default: the DMA engine's vSID)")
    um = sub.add_parser("unmap", help="unmap IOVA page(s) (+ TLBI_NH_VA, ATC_INV, CMD_SYNC)")
    um.add_argument("pasid", type=anyint)
    um.add_argument("iova", type=anyint)
    um.add_argument("--pages", type=int, default=1)
    um.add_argument("--sid", type=anyint)

    buf = sub.add_parser("buf", help="DMA buffers in reserved RAM")
    bsub = buf.add_subparsers(dest="buf_cmd", required=True, parser_class=parser_class)
    b = bsub.add_parser("alloc")
    b.add_argument("name")
    b.add_argument("size", type=anyint)
    b.add_argument("--fill", type=anyint, default=0, help="byte value")
    b = bsub.add_parser("read")
    b.add_argument("name")
    b.add_argument("--offset", type=anyint, default=0)
    b.add_argument("--len", type=anyint, default=None)
    b = bsub.add_parser("write")
    b.add_argument("name")
    b.add_argument("hex")
    b.add_argument("--offset", type=anyint, default=0)
    b = bsub.add_parser("cmp")
    b.add_argument("a")
    b.add_argument("b")
    b.add_argument("--len", type=anyint, default=None)
    bsub.add_parser("list")

    dma = sub.add_parser("dma", help="DMA engine descriptors")
    dsub = dma.add_subparsers(dest="dma_cmd", required=True, parser_class=parser_class)
    for name in ("copy", "fill"):
        d = dsub.add_parser(name)
        d.add_argument("--pasid", type=anyint, default=0, help="0 = no PASID (CD 0)")
        if name == "copy":
            d.add_argument("--src", type=anyint, required=True)
        else:
            d.add_argument("--pattern", type=anyint, default=0x5A5A5A5A5A5A5A5A, help="64-bit fill pattern")
        d.add_argument("--dst", type=anyint, required=True)
        d.add_argument("--len", type=anyint, required=True)
        d.add_argument("--no-wait", action="store_true", help="print the slot and return at once")
        d.add_argument("--timeout", type=float, default=5.0)
    d = dsub.add_parser("wait")
    d.add_argument("slot", type=int)
    d.add_argument("--timeout", type=float, default=5.0)
    dsub.add_parser("list")
    dsub.add_parser("status")
    dsub.add_parser("restart", help="disable, reprogram the ring, enable (clears HALTED)")
    d = dsub.add_parser("burst", help="N faulting FILLs with the EVTQ held: overflow and exact lost count")
    d.add_argument("--pasid", type=anyint, default=1)
    d.add_argument("--iova", type=anyint, required=True, help="first unmapped IOVA (one page per descriptor)")
    d.add_argument("--count", type=int, default=32)
    d.add_argument("--no-hold", action="store_true", help="let the interrupt thread drain during the burst")
    d.add_argument("--settle", type=float, default=2.0, help="seconds to wait for events to arrive")
    d.add_argument("--timeout", type=float, default=10.0)

    ev = sub.add_parser("events", help="the event log (drained from the EVTQ on interrupt)")
    _wait_opts(ev)
    pq = sub.add_parser("prq", help="the page-request log (drained from the PRIQ on interrupt)")
    _wait_opts(pq)
    pq.add_argument("--pending", action="store_true", help="only requests not yet answered")
    evq = sub.add_parser("evtq", help="hold/release EVTQ draining (to provoke an overflow)")
    evq.add_argument("action", choices=("hold", "release", "status"))

    resp = sub.add_parser("resp", help="CMD_PRI_RESP for a page-request group")
    resp.add_argument("sid", type=anyint)
    resp.add_argument("ssid", type=ssid_arg, help="PASID or 'none'")
    resp.add_argument("grpid", type=anyint, help="PRG index")
    resp.add_argument("code", choices=("success", "invalid", "failure"))

    pri = sub.add_parser("pri", help="endpoint PRI capability and the automatic-response policy")
    psub = pri.add_subparsers(dest="pri_cmd", required=True, parser_class=parser_class)
    p = psub.add_parser("auto")
    p.add_argument("policy", choices=("success", "invalid", "off"))
    p = psub.add_parser("enable")
    p.add_argument("--alloc", type=int, default=32)
    _dev_opt(p)
    p = psub.add_parser("disable")
    p.add_argument("--reset", action="store_true")
    _dev_opt(p)
    _dev_opt(psub.add_parser("reset", help="disable + Reset (discard outstanding requests)"))
    _dev_opt(psub.add_parser("status"))
    for cap in ("ats", "pasid"):
        c = sub.add_parser(cap, help=f"endpoint {cap.upper()} capability")
        c.add_argument("state", choices=("on", "off", "status"))
        _dev_opt(c)

    r = sub.add_parser("rescan", help="find removed endpoints again (after a hot-plug or a sysfs rescan)")
    r.add_argument("--no-bus", action="store_true", help="do not ask the PCI bus to rescan first")
    _nic_parsers(sub, parser_class)

    cmd = sub.add_parser("cmd", help="raw and invalidation commands on the CMDQ (+ CMD_SYNC)")
    csub = cmd.add_subparsers(dest="cmd_cmd", required=True, parser_class=parser_class)
    c = csub.add_parser("raw", help="one 16-byte command: 4 32-bit or 2 64-bit hex words, low first")
    c.add_argument("words", nargs="+", type=anyint)
    c = csub.add_parser("tlbi")
    c.add_argument("kind", choices=("nh-all", "nh-asid", "nh-va", "nh-vaa", "nsnh-all", "s12-vmall", "s2-ipa",
                                    "el2-all"))
    c.add_argument("--asid", type=anyint, default=0)
    c.add_argument("--vmid", type=anyint, default=0)
    c.add_argument("--addr", type=anyint, default=0)
    c.add_argument("--leaf", action="store_true")
    c.add_argument("--tg", type=int, default=0)
    c.add_argument("--num", type=int, default=0)
    c.add_argument("--scale", type=int, default=0)
    c.add_argument("--ttl", type=int, default=0)
    csub.add_parser("sync")
    c = csub.add_parser("cfgi")
    c.add_argument("what", choices=("all", "ste", "cd"))
    c.add_argument("--sid", type=anyint, default=0)
    c.add_argument("--ssid", type=anyint, default=0)
    return top
