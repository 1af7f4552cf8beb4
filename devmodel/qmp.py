"""QMP control of one QEMU: a small synchronous, thread-safe wrapper around ``qemu.qmp``.

Why a wrapper: the harness, ``devmodel run`` and the control socket's handler thread all
talk to the same QEMU, from different threads, and only need a handful of operations
(hot-plug, hot-unplug, query, quit). ``qemu.qmp.QMPClient`` is asyncio-based; here it runs
on a private event loop in a daemon thread and every public method submits a coroutine to
that loop and waits for it, so callers stay synchronous and any thread may call.

Hot-unplug is a conversation with the guest, not a command: ``device_del`` only *asks*
(QEMU presses the PCIe slot's attention button), the guest's pciehp driver acknowledges,
and QEMU then emits ``DEVICE_DELETED``. :meth:`QemuMonitor.device_del` therefore waits
for that event for the given id, and a guest that never acknowledges ends in
``TimeoutError`` rather than a silent "done".

Known QEMU 11.1.3 bug (project notes): ``device_del`` of a ``vfio-user-pci`` device that
has an MSI-X capability aborts QEMU. Devices without MSI-X unplug fine.

:func:`register_qmp_commands` adds ``qemu.plug``, ``qemu.unplug`` and ``qemu.query`` to
a control server, for ``devmodel run`` and :mod:`devmodel.session`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

if TYPE_CHECKING:
    from devmodel.commands.serve import ServedDevice
    from devmodel.control.server import ControlServer

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a plain QMP command may take before TimeoutError.
DEFAULT_COMMAND_TIMEOUT = 30.0
#: Seconds to wait for DEVICE_DELETED: the guest's pciehp acknowledges a removal about
#: 1.3 s after the attention button under TCG (project notes), so this leaves a wide margin.
DEFAULT_UNPLUG_TIMEOUT = 15.0
#: How many events :attr:`QemuMonitor.events` keeps (oldest dropped first).
EVENT_HISTORY = 1000
#: Pause between connection attempts while QEMU has not created its socket yet.
CONNECT_RETRY_DELAY = 0.05
DEVICE_DELETED = "DEVICE_DELETED"


class QmpError(RuntimeError):
    """QEMU answered a command with an error: ``error_class`` and ``desc`` are QEMU's own."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QemuMonitor:
    """One QMP connection to one QEMU; every method may be called from any thread.

    ``connect(path, timeout)`` first, ``close()`` at the end (idempotent). Commands raise
    :class:`QmpError` for QEMU errors, ``TimeoutError`` when QEMU does not answer in time
    and ``ConnectionError`` when the connection is gone (QEMU exited).
    """

    def __init__(self, command_timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        self.command_timeout = command_timeout
        self.path: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: QMPClient | None = None
        self._pump: asyncio.Task | None = None
        self._lock = threading.Lock()  # guards connect/close against each other
        self._cond = threading.Condition()  # guards the event history and _connected
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_HISTORY)
        self._seq = 0  # number of events ever received (monotonic, survives the deque's drops)
        self._connected = False

    # -- lifecycle ------------------------------------------------------------------------
    def connect(self, path: str, timeout: float = 10.0) -> "QemuMonitor":
        """Connect to QEMU's QMP UNIX socket and negotiate capabilities.

        Retries until ``timeout`` while the socket does not exist or refuses (QEMU still
        starting); ``ConnectionError`` after that.
        """
        with self._lock:
            if self._client is not None:
                raise RuntimeError(f"already connected to {self.path}")
            self._start_loop()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._run(self._connect(path), max(deadline - time.monotonic(), 0.1))
                    break
                except (ConnectError, TimeoutError) as exc:
                    if time.monotonic() >= deadline:
                        self._stop_loop()
                        raise ConnectionError(f"cannot connect to QMP socket {path}: {exc}") from None
                    time.sleep(CONNECT_RETRY_DELAY)
            self.path = path
            log.info("qmp: connected to %s", path)
            return self

    def close(self) -> None:
        """Disconnect and stop the private event loop (safe to call twice, or unconnected)."""
        with self._lock:
            if self._loop is None:
                return
            if self._client is not None:
                try:
                    self._run(self._disconnect(), 5.0)
                except Exception as exc:  # QEMU may be gone already: nothing to tidy
                    log.debug("qmp: disconnect: %s", exc)
            self._stop_loop()
            log.info("qmp: closed %s", self.path)

    def __enter__(self) -> "QemuMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True while QEMU's end of the connection is open."""
        with self._cond:
            return self._connected

    # -- commands -------------------------------------------------------------------------
    def command(self, name: str, /, **args: Any) -> Any:
        """Execute QMP command ``name`` with ``args``; return QEMU's ``return`` value."""
        return self.execute(name, args, self.command_timeout)

    def execute(self, name: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """:meth:`command` with the arguments as a dict and an explicit timeout."""
        client = self._require_client()
        log.debug("qmp: -> %s %s", name, args or "")
        try:
            result = self._run(client.execute(name, args or None), timeout or self.command_timeout)
        except ExecuteError as exc:
            log.info("qmp: %s failed: %s: %s", name, exc.error_class, exc)
            raise QmpError(name, exc.error_class, str(exc)) from None
        except TimeoutError:
            raise TimeoutError(f"QMP {name}: QEMU did not answer within {timeout or self.command_timeout:.1f} s") from None
        except (ExecInterruptedError, QMPError) as exc:
            raise ConnectionError(f"QMP {name}: connection to QEMU lost ({exc})") from None
        log.debug("qmp: <- %s %s", name, result)
        return result

    def device_add(self, spec: dict[str, Any], timeout: float | None = None) -> None:
        """Hot-plug a device (``spec`` as for ``-device`` JSON: driver, id, bus, ...).

        Returns once QEMU accepted it (realized and plugged; the guest learns about it
        through pciehp a little later).
        """
        log.info("qmp: device_add %s (id %s)", spec.get("driver"), spec.get("id"))
        self.execute("device_add", dict(spec), timeout)

    def device_del(self, dev_id: str, timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> dict[str, Any]:
        """Hot-unplug ``dev_id`` and wait until QEMU reports ``DEVICE_DELETED`` for it.

        The event comes only after the guest acknowledged the removal; ``TimeoutError``
        when it did not within ``timeout``. Returns the event.
        """
        mark = self.mark()  # events after this point may answer us (no race with a fast guest)
        log.info("qmp: device_del %s", dev_id)
        self.execute("device_del", {"id": dev_id}, timeout)
        event = self.wait_event(DEVICE_DELETED, lambda data: data.get("device") == dev_id,
                                timeout=timeout, after=mark)
        if event is None:
            raise TimeoutError(
                f"device_del {dev_id}: QEMU accepted the request but no DEVICE_DELETED arrived "
                f"within {timeout:.1f} s: the guest did not acknowledge the removal (is its pciehp "
                "driver running, or is the guest hung?). The device stays plugged; QEMU keeps "
                "the request pending.")
        log.info("qmp: %s deleted", dev_id)
        return event

    def query_pci(self) -> list[dict[str, Any]]:
        """QEMU's ``query-pci`` answer: one dict per bus, devices nested (bridges too)."""
        return self.command("query-pci")

    def quit(self) -> None:
        """Ask QEMU to exit now. QEMU closing the connection while answering counts as done."""
        log.info("qmp: quit")
        try:
            self.execute("quit", None, 5.0)
        except ConnectionError:
            pass

    def system_powerdown(self) -> None:
        """Press the ACPI power button (the guest decides what to do with it)."""
        self.command("system_powerdown")

    # -- events ---------------------------------------------------------------------------
    def mark(self) -> int:
        """The current event sequence number, for :meth:`wait_event`'s ``after``: take it
        before causing an event so a fast answer is not missed."""
        with self._cond:
            return self._seq

    @property
    def events(self) -> list[dict[str, Any]]:
        """Events seen so far, oldest first (the last :data:`EVENT_HISTORY`)."""
        with self._cond:
            return list(self._events)

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float = DEFAULT_COMMAND_TIMEOUT, after: int | None = None) -> dict[str, Any] | None:
        """The first event ``name`` (with ``match(data)`` true) after sequence ``after``.

        ``after`` defaults to now. None on timeout; ``ConnectionError`` if QEMU goes away
        while waiting.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            start = self._seq if after is None else after
            while True:
                found = self._find_event(name, match, start)
                if found is not None:
                    return found
                if not self._connected:
                    raise ConnectionError(f"QEMU closed the QMP connection while waiting for {name}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def _find_event(self, name: str, match: Callable[[dict[str, Any]], bool] | None,
                    after: int) -> dict[str, Any] | None:
        first_seq = self._seq - len(self._events)  # sequence number of the oldest kept event
        for i, event in enumerate(self._events):
            if first_seq + i < after or event.get("event") != name:
                continue
            if match is None or match(event.get("data") or {}):
                return event
        return None

    # -- the private event loop -----------------------------------------------------------
    def _start_loop(self) -> None:
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        # A daemon thread: interpreter exit must never wait for it (the harness's atexit
        # safety net still uses it to quit QEMU).
        thread = threading.Thread(target=loop.run_forever, name="qmp", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        self._client = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if not loop.is_running():
            loop.close()
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the private loop and wait up to ``timeout`` seconds for it."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise ConnectionError("QMP monitor is closed")
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), loop)
        try:
            return future.result(timeout + 1.0)
        except TimeoutError:
            future.cancel()
            raise

    def _require_client(self) -> QMPClient:
        client = self._client
        if client is None:
            raise ConnectionError("QMP monitor is not connected")
        return client

    async def _connect(self, path: str) -> None:
        # Created on the loop's own thread: the library's asyncio objects bind to it.
        client = QMPClient("devmodel")
        try:
            await client.connect(path)
        except BaseException:
            await client.disconnect()
            raise
        self._client = client
        with self._cond:
            self._connected = True
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(client))

    async def _pump_events(self, client: QMPClient) -> None:
        """Move every event into the thread-safe history; notice the connection ending."""
        get_event = asyncio.ensure_future(client.events.get())
        state_change = asyncio.ensure_future(client.runstate_changed())
        try:
            while True:
                done, _ = await asyncio.wait({get_event, state_change}, return_when=asyncio.FIRST_COMPLETED)
                if get_event in done:
                    self._record(dict(get_event.result()))
                    get_event = asyncio.ensure_future(client.events.get())
                if state_change in done:
                    if client.runstate != Runstate.RUNNING:
                        log.info("qmp: connection ended (%s)", client.runstate.name)
                        break
                    state_change = asyncio.ensure_future(client.runstate_changed())
        finally:
            get_event.cancel()
            state_change.cancel()
            with self._cond:
                self._connected = False
                self._cond.notify_all()

    def _record(self, event: dict[str, Any]) -> None:
        log.debug("qmp: event %s %s", event.get("event"), event.get("data", ""))
        with self._cond:
            self._events.append(event)
            self._seq += 1
            self._cond.notify_all()

    async def _disconnect(self) -> None:
        client, pump = self._client, self._pump
        self._pump = None
        if client is not None:
            await client.disconnect()
        if pump is not None:
            pump.cancel()


# -- summaries --------------------------------------------------------------------------
def summarize_pci(buses: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten a ``query-pci`` answer into one small dict per function, bridges descended.

    Keys: ``bdf`` ("BB:DD.F"), ``vendor_id``, ``device_id``, ``class``, ``qdev_id``
    (the QEMU id, "" when none) and ``bus_id`` of the parent bus's device ("" for bus 0).
    """
    out: list[dict[str, Any]] = []

    def walk(devices: Sequence[dict[str, Any]]) -> None:
        for dev in devices:
            ident = dev.get("id") or {}
            out.append({
                "bdf": f"{dev.get('bus', 0):02x}:{dev.get('slot', 0):02x}.{dev.get('function', 0)}",
                "vendor_id": f"{ident.get('vendor', 0):#06x}",
                "device_id": f"{ident.get('device', 0):#06x}",
                "class": f"{(dev.get('class_info') or {}).get('class', 0):#06x}",
                "description": (dev.get("class_info") or {}).get("desc", ""),
                "qdev_id": dev.get("qdev_id", ""),
            })
            bridge = dev.get("pci_bridge") or {}
            walk(bridge.get("devices") or [])

    for bus in buses:
        walk(bus.get("devices") or [])
    return out


# -- control-socket commands --------------------------------------------------------------
def register_qmp_commands(control: "ControlServer", monitor: QemuMonitor,
                          served: Sequence["ServedDevice"]) -> None:
    """Register ``qemu.plug``, ``qemu.unplug`` and ``qemu.query`` on ``control``.

    ``device`` is a served device name (``ServedDevice.name``); anything else is rejected
    by the control server as ``bad-args``. QEMU errors and unacknowledged unplugs become
    ``failed`` with QEMU's message. The handlers never take MODEL_LOCK: while QEMU
    realizes a plugged device it talks to the vfio-user server, which needs that lock.
    """
    from devmodel.commands.serve import qemu_device_spec
    from devmodel.control.protocol import Param
    from devmodel.control.server import CommandFailed

    by_name = {item.name: item for item in served}
    names = tuple(by_name)
    device_param = Param(str, required=True, choices=names, help="served device name")
    timeout_param = Param(int, default=int(DEFAULT_UNPLUG_TIMEOUT), min=1, max=600,
                          help="seconds to wait for QEMU (and for the guest's acknowledgement)")

    def guarded(what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except QmpError as exc:
            raise CommandFailed(f"QEMU refused {what}: {exc.error_class}: {exc.desc}") from None
        except (TimeoutError, ConnectionError) as exc:
            raise CommandFailed(f"{what}: {exc}") from None

    def plug(device: str, timeout: int) -> dict[str, Any]:
        item = by_name[device]
        spec = qemu_device_spec(item.path, item.qemu_id, item.model)
        guarded(f"device_add {item.qemu_id}", lambda: monitor.device_add(spec, timeout))
        return {"device": device, "qemu_id": item.qemu_id, "plugged": True}

    def unplug(device: str, timeout: int) -> dict[str, Any]:
        item = by_name[device]
        event = guarded(f"device_del {item.qemu_id}", lambda: monitor.device_del(item.qemu_id, timeout))
        return {"device": device, "qemu_id": item.qemu_id, "unplugged": True,
                "path": (event.get("data") or {}).get("path", "")}

    def query() -> list[dict[str, Any]]:
        return guarded("query-pci", lambda: summarize_pci(monitor.query_pci()))

    control.register("qemu.plug", plug, {"device": device_param, "timeout": timeout_param},
                     help="hot-plug a served device into QEMU again (QMP device_add)")
    control.register("qemu.unplug", unplug, {"device": device_param, "timeout": timeout_param},
                     help="hot-unplug a served device (QMP device_del; waits for DEVICE_DELETED, "
                          "which needs the guest's acknowledgement)")
    control.register("qemu.query", query, help="PCI functions QEMU shows the guest (QMP query-pci)")
