"""Wire format of the control socket (documented in README "Control interface").

One JSON object per line, UTF-8, at most :data:`MAX_LINE` bytes including the newline.

Request::

    {"id": 7, "cmd": "inject.endpoint.dma", "args": {"iova": 4096, "pasid": 1}}

``id`` is any JSON scalar the client chooses (echoed back), ``args`` is optional.

Reply, exactly one per request, in order::

    {"id": 7, "ok": true, "result": {...}}
    {"id": 7, "ok": false, "error": {"code": "bad-args", "message": "iova: expected int"}}

Error codes: ``bad-json`` (not UTF-8 / not JSON / not an object), ``too-long``,
``unknown-command``, ``bad-args`` (missing, unexpected, wrongly typed or out-of-range
argument), ``failed`` (the command ran and could not do it). A bad request never closes
the connection and never disturbs the model.

Streaming commands (``trace.follow``) reply once with ``ok`` and then send
``{"event": {...}}`` lines until the client closes the connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LINE = 64 * 1024


class RequestError(Exception):
    """A request the server rejects; ``code`` is one of the documented error codes."""

    def __init__(self, code: str, message: str, req_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id


@dataclass(frozen=True)
class Param:
    """One argument of a command: its type, whether it is required, its range/choices."""

    type: type
    required: bool = False
    default: Any = None
    min: int | None = None
    max: int | None = None
    choices: tuple[Any, ...] | None = None
    help: str = ""

    def check(self, name: str, value: Any) -> Any:
        # bool is an int in Python; JSON true must not pass as a number or vice versa.
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            if isinstance(value, str):
                try:
                    value = int(value, 0)
                except ValueError:
                    raise RequestError("bad-args", f"{name}: expected an integer, got {value!r}") from None
            else:
                raise RequestError("bad-args", f"{name}: expected an integer, got {_kind(value)}")
        elif self.type is bool and not isinstance(value, bool):
            raise RequestError("bad-args", f"{name}: expected true/false, got {_kind(value)}")
        elif self.type is str and not isinstance(value, str):
            raise RequestError("bad-args", f"{name}: expected a string, got {_kind(value)}")
        if self.min is not None and value < self.min:
            raise RequestError("bad-args", f"{name}: {value} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise RequestError("bad-args", f"{name}: {value} is above the maximum {self.max}")
        if self.choices is not None and value not in self.choices:
            raise RequestError("bad-args", f"{name}: {value!r} is not one of {list(self.choices)}")
        return value

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type.__name__, "required": self.required}
        for k in ("default", "min", "max", "choices"):
            v = getattr(self, k)
            if v is not None:
                d[k] = list(v) if k == "choices" else v
        if self.help:
            d["help"] = self.help
        return d


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def check_args(params: dict[str, Param], args: Any) -> dict[str, Any]:
    """Validate ``args`` against ``params``: every problem is a bad-args RequestError."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError("bad-args", f"args must be an object, got {_kind(args)}")
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise RequestError("bad-args", f"unexpected argument(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for name, p in params.items():
        if name in args:
            out[name] = p.check(name, args[name])
        elif p.required:
            raise RequestError("bad-args", f"missing argument: {name}")
        else:
            out[name] = p.default
    return out


def parse_request(line: bytes) -> tuple[Any, str, Any]:
    """(id, cmd, args) of one request line, or RequestError (``id`` kept when readable)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError("bad-json", f"not a JSON line: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("bad-json", "a request must be a JSON object")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError("bad-json", "missing string field 'cmd'", obj.get("id"))
    return obj.get("id"), cmd, obj.get("args")


def encode(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=_default) + "\n").encode()


def _default(value: Any) -> Any:
    if hasattr(value, "_asdict"):
        return value._asdict()
    if hasattr(value, "__dict__"):
        return vars(value)
    return str(value)


def ok(req_id: Any, result: Any) -> bytes:
    return encode({"id": req_id, "ok": True, "result": result})


def error(req_id: Any, code: str, message: str) -> bytes:
    return encode({"id": req_id, "ok": False, "error": {"code": code, "message": message}})
