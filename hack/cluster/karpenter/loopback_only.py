"""Runs a command in a network namespace of its own whose only interface is loopback, with
the given TCP ports of its loopback forwarded to the same ports of the host's loopback.

For programs that listen on every interface and cannot be told otherwise (Karpenter binds
its metrics and health ports to ":port"): in here every interface is loopback, and the
program still reaches the API server at the address its kubeconfig names. Two copies never
collide on a port either. Needs root (CAP_SYS_ADMIN), as the local cluster's scripts have.

    loopback_only.py PORT[,PORT...] -- COMMAND [ARGS...]
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
PR_SET_PDEATHSIG = 1
LIBC = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SystemExit(f"loopback_only: {what} failed: {os.strerror(errno)}")


def _die_with_parent() -> None:
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _forward(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def _serve(listeners: dict[int, socket.socket], child: subprocess.Popen[bytes]) -> int:
    servers = [
        await asyncio.start_server(
            lambda r, w, port=port: _forward(port, r, w), sock=sock, limit=1 << 20
        )
        for port, sock in listeners.items()
    ]
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, child.send_signal, signum)
    code = await asyncio.to_thread(child.wait)
    for server in servers:
        server.close()
    return code


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    ports = [int(p) for p in argv[0].split(",") if p]
    host = os.open("/proc/self/ns/net", os.O_RDONLY)
    _check(LIBC.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    _loopback_up()
    listeners = {port: socket.create_server(("127.0.0.1", port)) for port in ports}
    for sock in listeners.values():
        sock.setblocking(False)
    # Born in the new namespace; dies with us even if we are killed without a word.
    child = subprocess.Popen(argv[2:], preexec_fn=_die_with_parent)
    # Back to the host's namespace: connections to the forwarded ports are made from there.
    _check(LIBC.setns(host, CLONE_NEWNET), "setns(host)")
    return asyncio.run(_serve(listeners, child))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
