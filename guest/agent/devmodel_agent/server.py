"""The agent's UNIX-socket protocol: one request per connection, streamed text replies.

Request: one JSON line ``{"argv": [...]}`` (the ``dm`` arguments after the global options).
Reply: the subcommand's output lines, then ``@@rc=N`` as the last line. Why text: the
output *is* the machine-readable format the user sees, so the client only copies it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading

from devmodel_agent.cliparse import ParseError, RaisingParser, build

log = logging.getLogger(__name__)

RC_MARKER = "@@rc="
MAX_REQUEST = 64 * 1024


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: AgentServer = self.server  # type: ignore[assignment]
        raw = self.rfile.readline(MAX_REQUEST)
        try:
            argv = json.loads(raw)["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError("argv must be a list of strings")
        except (ValueError, KeyError, TypeError) as e:
            self._reply(1, [f"error errno=EINVAL msg=\"bad request: {e}\""])
            return
        rc, lines = server.run(argv)
        self._reply(rc, lines)
        if server.stopping:
            threading.Thread(target=server.shutdown, daemon=True).start()

    def _reply(self, rc: int, lines: list[str]) -> None:
        try:
            self.wfile.write("".join(line + "\n" for line in [*lines, f"{RC_MARKER}{rc}"]).encode())
        except OSError as e:
            log.info("client went away: %s", e)


class AgentServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves an :class:`~devmodel_agent.agent.Agent` on a UNIX socket (one thread per client)."""

    daemon_threads = True

    def __init__(self, path: str, agent) -> None:
        if os.path.exists(path):
            os.unlink(path)
        self.path = path
        self.agent = agent
        self.parser = build(RaisingParser)
        self.stopping = False
        super().__init__(path, _Handler)

    def run(self, argv: list[str]) -> tuple[int, list[str]]:
        try:
            args = self.parser.parse_args(argv)
        except ParseError as e:
            return 1, [f"error errno=EINVAL msg=\"{str(e).strip()}\""]
        if args.cmd in ("up", "daemon"):
            return 0, ["up already=1", *self.agent.status_lines()]
        if args.cmd == "down":
            self.agent.stop()
            self.stopping = True
            return 0, ["down ok=1"]
        log.info("request: %s", " ".join(argv))
        return self.agent.handle(args)

    def server_close(self) -> None:
        super().server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def request(path: str, argv: list[str], timeout: float | None = None) -> tuple[int, list[str]]:
    """Send one request; return (exit code, output lines). OSError when no agent listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps({"argv": argv}) + "\n").encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.decode(errors="replace").splitlines()
    rc = 1
    if lines and lines[-1].startswith(RC_MARKER):
        rc = int(lines.pop()[len(RC_MARKER):])
    else:
        lines.append("error errno=EPIPE msg=\"agent closed the connection early\"")
    return rc, lines
