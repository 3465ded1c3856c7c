"""Is a listening port free? The probe `moemesh up` runs before its services (and Envoy) bind their ports.

The probe sets SO_REUSEADDR because every server it speaks for does (gRPC core, Envoy): then a port whose previous
connections sit in TIME_WAIT (a mesh stopped moments ago, with clients connected) counts as free, as it is for those
servers, and only a socket still bound to it (a listener) makes it busy. Without the option the probe refused such a
port for up to 60 s after a stop.
"""

from __future__ import annotations

import socket


def port_free(host: str, port: int) -> bool:
    """True when a server with SO_REUSEADDR could listen on host:port now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
