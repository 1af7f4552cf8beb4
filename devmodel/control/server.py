"""The listening side of the control socket.

It runs its own thread with a selector, independent of the vfio-user backend, so a
hung or busy device loop never makes the control socket unresponsive and a control
client can never stall QEMU. Commands are registered by the layers that implement them
(``register(name, handler, params, help)``); a handler gets validated keyword arguments
and returns a JSON-able result or raises :class:`CommandFailed`. Handlers that touch model
state take :data:`vfio_user.device.MODEL_LOCK` themselves.

Built in: ``help`` (commands and their parameters), ``stats`` (every registered counter
provider), ``trace.dump`` (recorded events, optionally of one fault), ``trace.follow``
(stream new events), ``trace.clear``.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from devmodel.control import protocol as P
from devmodel.control.protocol import MAX_LINE, Param, RequestError
from devmodel.trace import TRACER, TraceEvent, Tracer

log = logging.getLogger(__name__)


class CommandFailed(Exception):
    """The command was valid but could not be carried out (reply code ``failed``)."""


@dataclass
class Command:
    name: str
    handler: Callable[..., Any]
    params: dict[str, Param]
    help: str


@dataclass
class _Conn:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    discarding: bool = False  # inside an over-long line: drop bytes until its newline
    unsubscribe: Callable[[], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class ControlServer:
    """A JSON-lines command server on a UNIX socket (mode 0600)."""

    def __init__(self, path: str, tracer: Tracer = TRACER) -> None:
        self.path = path
        self.tracer = tracer
        self.commands: dict[str, Command] = {}
        self.stats_providers: dict[str, Callable[[], dict[str, Any]]] = {}
        self.errors = 0  # bad requests answered (visible in stats)
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._listen = self._bind(path)
        self._sel.register(self._listen, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._register_builtins()

    @staticmethod
    def _bind(path: str) -> socket.socket:
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(8)
        s.setblocking(False)
        return s

    # --- registration -------------------------------------------------------------------
    def register(self, name: str, handler: Callable[..., Any], params: dict[str, Param] | None = None,
                 help: str = "") -> None:
        if name in self.commands:
            raise ValueError(f"control command {name!r} registered twice")
        self.commands[name] = Command(name, handler, params or {}, help)

    def add_stats(self, name: str, provider: Callable[[], dict[str, Any]]) -> None:
        """``stats`` will include ``{name: provider()}``."""
        self.stats_providers[name] = provider

    def _register_builtins(self) -> None:
        self.register("help", self._help, help="list commands and their parameters")
        self.register("stats", self._stats, help="all counters: faults by type, lost events, overflows, responses")
        self.register("trace.dump", self._trace_dump,
                      {"fault": Param(int, min=1, help="only this fault id"),
                       "last": Param(int, default=1000, min=1, max=100000, help="at most this many events")},
                      help="recorded trace events, oldest first")
        self.register("trace.clear", lambda: self.tracer.clear() or {}, help="forget recorded events")
        self.register("trace.follow", None, help="stream every new trace event as {\"event\": ...} lines")

    def _help(self) -> dict[str, Any]:
        return {c.name: {"help": c.help, "params": {k: p.describe() for k, p in c.params.items()}}
                for c in sorted(self.commands.values(), key=lambda c: c.name)}

    def _stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, provider in self.stats_providers.items():
            try:
                out[name] = provider()
            except Exception as exc:  # one broken provider must not hide the others
                out[name] = {"error": str(exc)}
        out["trace"] = {"events": len(self.tracer.events()), "dropped": self.tracer.dropped}
        out["control"] = {"bad_requests": self.errors}
        return out

    def _trace_dump(self, fault: int | None, last: int) -> list[dict[str, Any]]:
        evs = self.tracer.events(fault)[-last:]
        return [{"fault": e.fault, "hop": e.hop, "t_ns": e.t_ns, **e.detail} for e in evs]

    # --- loop ---------------------------------------------------------------------------
    def start(self) -> "ControlServer":
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for conn in list(self._conns.values()):
            self._close(conn)
        self._sel.close()
        self._listen.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _run(self) -> None:
        while not self._stopping:
            for key, events in self._sel.select(timeout=1.0):
                if key.data == "wake":
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    for conn in list(self._conns.values()):
                        if conn.outbuf:  # events queued by other threads (trace.follow)
                            self._flush(conn)
                elif key.data is None:
                    self._accept()
                else:
                    conn = key.data
                    if events & selectors.EVENT_READ:
                        self._readable(conn)
                    if events & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                        self._flush(conn)

    def _accept(self) -> None:
        try:
            sock, _ = self._listen.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        self._conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)
        log.info("control: client connected")

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        while True:
            nl = conn.inbuf.find(b"\n")
            if nl < 0:
                if len(conn.inbuf) > MAX_LINE:
                    conn.inbuf.clear()
                    if not conn.discarding:
                        conn.discarding = True
                        self._bad(conn, None, RequestError("too-long", f"request line exceeds {MAX_LINE} bytes"))
                return
            line = bytes(conn.inbuf[:nl])
            del conn.inbuf[:nl + 1]
            if conn.discarding:  # tail of an over-long line: already answered
                conn.discarding = False
                continue
            if len(line) + 1 > MAX_LINE:
                self._bad(conn, None, RequestError("too-long", f"request line exceeds {MAX_LINE} bytes"))
                continue
            if line.strip():
                self._request(conn, line)

    def _request(self, conn: _Conn, line: bytes) -> None:
        try:
            req_id, name, raw_args = P.parse_request(line)
        except RequestError as err:
            self._bad(conn, err.req_id, err)
            return
        cmd = self.commands.get(name)
        if cmd is None:
            self._bad(conn, req_id, RequestError("unknown-command", f"unknown command {name!r} (try 'help')"))
            return
        try:
            args = P.check_args(cmd.params, raw_args)
        except RequestError as err:
            self._bad(conn, req_id, err)
            return
        if name == "trace.follow":
            self._follow(conn, req_id)
            return
        try:
            result = cmd.handler(**args)
        except CommandFailed as exc:
            self.errors += 1
            self._send(conn, P.error(req_id, "failed", str(exc)))
            return
        except Exception as exc:  # a handler bug is reported, never fatal to the model
            log.exception("control: %s failed", name)
            self.errors += 1
            self._send(conn, P.error(req_id, "failed", f"{type(exc).__name__}: {exc}"))
            return
        self._send(conn, P.ok(req_id, result))

    def _follow(self, conn: _Conn, req_id: Any) -> None:
        if conn.unsubscribe is not None:
            self._send(conn, P.ok(req_id, {"following": True}))
            return

        def on_event(ev: TraceEvent) -> None:
            self._send(conn, P.encode({"event": {"fault": ev.fault, "hop": ev.hop, "t_ns": ev.t_ns,
                                                 **ev.detail}}))
            os.write(self._wake_w, b"x")
        self._send(conn, P.ok(req_id, {"following": True}))
        conn.unsubscribe = self.tracer.subscribe(on_event)

    def _bad(self, conn: _Conn, req_id: Any, err: RequestError) -> None:
        self.errors += 1
        log.info("control: rejected request: %s: %s", err.code, err.message)
        self._send(conn, P.error(req_id, err.code, err.message))

    def _send(self, conn: _Conn, data: bytes) -> None:
        with conn.lock:
            if len(conn.outbuf) > 16 * MAX_LINE * 16:
                return  # a follower that stopped reading: drop rather than grow without bound
            conn.outbuf += data
        if threading.current_thread() is self._thread:
            self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        with conn.lock:
            if conn.sock.fileno() < 0:
                return
            try:
                n = conn.sock.send(conn.outbuf) if conn.outbuf else 0
                del conn.outbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                conn.outbuf.clear()
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
            try:
                self._sel.modify(conn.sock, want, conn)
            except (KeyError, ValueError):
                pass

    def _close(self, conn: _Conn) -> None:
        if conn.unsubscribe is not None:
            conn.unsubscribe()
            conn.unsubscribe = None
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self._conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        log.info("control: client disconnected")
