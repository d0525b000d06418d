#!/usr/bin/env python3
"""What DKIM signing costs hamta per message, in CPU, split into its parts (issue 21).

Signs the relay benchmark's message (smtp-source's 2 KB, with hamta's Received: header) with
``hamta.dkim_signing.DkimSigner`` as the relay does, and times apart the private-key operation
alone (OpenSSL through ``cryptography``), so that what is left is hamta's own Python: header
parsing, relaxed canonicalization, the hashes and the header's text (``hamta.dkim_header``).
CPU time of this process (``time.process_time``), best of ``--rounds``; the last line is JSON.

Usage: .venv/bin/python bench/dkim_sign.py [--messages 500] [--rounds 5] [--size 2048]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hamta.config import DKIM_DEFAULT_HEADERS
from hamta.dkim_signing import DkimSigner, generate_key


def _message(size: int) -> bytes:
    head = (
        b"Received: from bench.test ([127.0.0.1])\r\n\tby hamta.bench.test (hamta) with ESMTP"
        b" id 18E2F1C0A1B00001\r\n\tfor <to@sink.test>;\r\n\tMon, 7 Dec 2026 10:00:00 +0000\r\n"
        b"From: <from@bench.test>\r\nTo: <to@sink.test>\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000"
        b"\r\nMessage-Id: <1.2.3@bench.test>\r\nSubject: bench\r\n\r\n"
    )
    line = b"X" * 78 + b"\r\n"
    return head + line * (size // len(line))


def _best_ms(work: Callable[[], object], count: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(count):
            work()
        best = min(best, (time.process_time() - started) / count * 1000)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    message = _message(args.size)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm, selector in (("rsa-sha256", "rsa"), ("ed25519-sha256", "ed")):
            key = generate_key(Path(tmp), "bench.test", selector, algorithm)  # type: ignore[arg-type]
            signer = DkimSigner([key], DKIM_DEFAULT_HEADERS)
            keys = signer.keys_for(message, "from@bench.test")
            sign = functools.partial(signer.sign, message, keys)
            whole = _best_ms(sign, args.messages, args.rounds)
            digest = hashlib.sha256(message).digest()
            operation = functools.partial(key.sign_digest, digest)
            private = _best_ms(operation, args.messages, args.rounds)
            figures[f"{selector}_sign_ms"] = round(whole, 4)
            figures[f"{selector}_private_key_ms"] = round(private, 4)
            figures[f"{selector}_python_ms"] = round(whole - private, 4)
            print(
                f"{algorithm}: {whole:.3f} ms a message, of which the private-key operation "
                f"{private:.3f} ms and hamta's own work {whole - private:.3f} ms"
            )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
