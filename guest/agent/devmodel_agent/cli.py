"""``dm``: the thin client, ``dm up`` (start the daemon in the background) and ``dm daemon``.

Every subcommand but ``up``/``daemon`` is parsed here (for ``--help`` and early errors),
then sent as-is to the daemon, whose output lines are printed unchanged. Exit codes:
0 ok, 1 error (an ``error errno=... msg=...`` line says why), 3 timeout.
"""

from __future__ import annotations

import os
import sys
import time

from devmodel_agent import DEFAULT_SOCKET
from devmodel_agent.cliparse import build

UP_TIMEOUT = 120.0  # the guest runs under TCG: Python start + bring-up can take seconds
RC_ERROR = 1


def socket_path(args) -> str:
    return args.socket or os.environ.get("DM_SOCKET") or DEFAULT_SOCKET


def strip_globals(argv: list[str]) -> list[str]:
    """argv without the global ``--socket`` option (it is always before the subcommand)."""
    out = list(argv)
    while out and out[0].startswith("--socket"):
        out = out[2:] if out[0] == "--socket" else out[1:]
    return out


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line)
    sys.stdout.flush()


def _error(msg: str, errno_name: str = "ECONNREFUSED") -> int:
    _print([f"error errno={errno_name} msg=\"{msg}\""])
    return RC_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build().parse_args(argv)
    path = socket_path(args)
    sub_argv = strip_globals(argv)
    if args.cmd == "daemon":
        return run_daemon(args, path)
    if args.cmd == "up":
        return up(path, sub_argv[1:], args.log)
    from devmodel_agent.server import request
    try:
        rc, lines = request(path, sub_argv)
    except OSError as e:
        return _error(f"agent not running at {path} ({e.strerror or e}); start it with 'dm up'")
    _print(lines)
    return rc


def up(path: str, options: list[str], logfile: str) -> int:
    """Start ``dm daemon`` detached; wait until it serves; print its status lines."""
    import subprocess  # only here: keeps the thin client's start-up light in the guest
    from devmodel_agent.server import request
    try:
        rc, lines = request(path, ["status"], timeout=10)
        _print(["up already=1", *lines])
        return rc
    except OSError:
        pass
    with open(logfile, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "devmodel_agent", "--socket", path, "daemon", *options],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + UP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(logfile)
            _print([f"error errno=EIO msg=\"agent exited with {proc.returncode}\""] +
                   [f"log {line}" for line in tail])
            return RC_ERROR
        try:
            rc, lines = request(path, ["status"], timeout=10)
        except OSError:
            time.sleep(0.05)
            continue
        _print([f"up pid={proc.pid} socket={path}", *lines])
        return rc
    proc.kill()
    return _error(f"agent did not come up within {UP_TIMEOUT:.0f} s", "ETIMEDOUT")


def _tail(path: str, n: int = 15) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def run_daemon(args, path: str, backends=None) -> int:
    """Bring the devices up, then serve requests until ``dm down`` (foreground)."""
    import logging
    log = logging.getLogger(__name__)
    from devmodel_agent.agent import Agent
    from devmodel_agent.hw import AgentError
    from devmodel_agent.server import AgentServer
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(threadName)s %(name)s: %(message)s")
    try:
        if backends is None:
            from devmodel_agent.guestio import build_backends
            backends = build_backends(args.smmu, args.engine, args.nic)
        agent = Agent(backends, cmdq_log2=args.cmdq_log2, evtq_log2=args.evtq_log2, priq_log2=args.priq_log2,
                      sid_bits=args.sid_bits, ring_log2=args.ring_log2)
        agent.start()
    except (AgentError, OSError) as e:
        log.error("bring-up failed: %s", e)
        print(f"error msg=\"bring-up failed: {e}\"", file=sys.stderr)
        if backends is not None:
            backends.close()
        return RC_ERROR
    server = AgentServer(path, agent)
    log.info("agent serving on %s", path)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if agent.up:
            agent.stop()
        backends.close()
    return 0
