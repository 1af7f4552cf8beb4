"""A blocking Python client for the control socket (used by ``devmodel stats|trace|inject``)."""

from __future__ import annotations

import itertools
import json
import socket
from typing import Any, Iterator


class ControlError(Exception):
    """An error reply: ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlClient:
    """One connection; :meth:`call` sends a request and returns its result."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._file = self.sock.makefile("rb")
        self._ids = itertools.count(1)

    def call(self, cmd: str, **args: Any) -> Any:
        req_id = next(self._ids)
        self.send_raw(json.dumps({"id": req_id, "cmd": cmd, "args": args}).encode() + b"\n")
        reply = self.read_reply()
        if reply.get("id") != req_id:
            raise ControlError("protocol", f"reply id {reply.get('id')!r} for request {req_id}")
        return self._result(reply)

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests use it for malformed requests)."""
        self.sock.sendall(data)

    def read_reply(self) -> dict[str, Any]:
        """The next reply line (event lines of a follow stream are skipped)."""
        while True:
            line = self._file.readline()
            if not line:
                raise ConnectionError("control socket closed")
            obj = json.loads(line)
            if "event" not in obj:
                return obj

    @staticmethod
    def _result(reply: dict[str, Any]) -> Any:
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        raise ControlError(err.get("code", "?"), err.get("message", ""))

    def follow(self) -> Iterator[dict[str, Any]]:
        """Start ``trace.follow`` now; the returned iterator yields each event as it arrives."""
        self.call("trace.follow")
        return self._events()

    def _events(self) -> Iterator[dict[str, Any]]:
        while True:
            line = self._file.readline()
            if not line:
                return
            obj = json.loads(line)
            if "event" in obj:
                yield obj["event"]

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
