"""Ports for the servers the workbench starts (TensorBoard, JupyterLab, Ray Serve's proxy): a free
one, and why one could not be listened on, asked before a server starts so the refusal names the
flag instead of the server failing in its own log."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the system's pick), for a server about to start on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on ``host:port``, None if it could: ``socket.gaierror`` if
    ``host`` is no address, else the bind's error. Bound as servers bind (``SO_REUSEADDR``, as
    uvicorn, werkzeug and jupyter do: a port in TIME_WAIT holds nobody); IPv4 and IPv6 alike."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        return e
    return None
