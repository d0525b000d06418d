"""Self-signed TLS material for STARTTLS tests, made with the openssl command line tool.

The openssl CLI is used rather than the ``cryptography`` package so the test suite needs no
dependency beyond what the relay already has.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path


def make_self_signed(dir: Path, hostname: str, *, days: int = 30) -> tuple[Path, Path]:
    """Write ``<hostname>.crt`` and ``<hostname>.key`` (PEM, unencrypted) into ``dir``.

    The certificate is self-signed for ``hostname``, which goes into the subject CN and the
    subjectAltName (as an IP entry when it is an address). Returns ``(cert, key)``.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("the openssl command line tool is not installed")
    try:
        ipaddress.ip_address(hostname)
        san = f"IP:{hostname}"
    except ValueError:
        san = f"DNS:{hostname}"
    dir.mkdir(parents=True, exist_ok=True)
    cert, key = dir / f"{hostname}.crt", dir / f"{hostname}.key"
    argv = [openssl, "req", "-x509", "-nodes", "-days", str(days), "-subj", f"/CN={hostname}"]
    # P-256 keys are generated in milliseconds; RSA keys would slow every TLS test.
    argv += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    argv += ["-keyout", str(key), "-out", str(cert), "-addext", f"subjectAltName={san}"]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return cert, key
