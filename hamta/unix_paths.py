"""How long a unix socket's path may be, and a clear refusal of one that is longer.

Linux keeps a socket's path in ``sun_path``, 108 bytes with the terminating NUL. A longer one
fails only when the socket is bound (``OSError: AF_UNIX path too long``), deep inside whichever
process binds it: a lab's relay, say, that then never becomes ready. Whoever builds such a path
from a directory it was given checks it up front with :func:`check_socket_path`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = ["UNIX_PATH_MAX", "SocketPathError", "check_socket_path"]

UNIX_PATH_MAX: Final = 107  # sun_path's 108 bytes, less the terminating NUL


class SocketPathError(OSError):
    """A unix socket path too long to bind: an OSError, as ``bind``'s own failure would be."""


def check_socket_path(path: Path) -> Path:
    """``path`` if a unix socket can be bound there; SocketPathError saying why not otherwise.

    The path is measured as it is given, as ``bind`` receives it (a relative one is resolved
    by the kernel, without the limit applying to the whole).
    """
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise SocketPathError(
            f"unix socket path {path} is {size} bytes, longer than the {UNIX_PATH_MAX} a socket"
            f" allows: use a shorter directory (e.g. under /tmp)"
        )
    return path
