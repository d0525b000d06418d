"""What DANE's lookups cost a delivery: hamta run twice on one load, without and with DNSSEC.

Both runs find the sink through DNS (no static route): unbound on 127.0.0.153 serves sink.test,
signed with ldns (cluster.lab.dnssec), MX ``mx.sink.test`` → the sink's address, with a trust
anchor for the zone. Without: ``[dns] dnssec = false``, so MX and A lookups only. With:
``dnssec = true``, so validated MX and A lookups and, for each new delivery connection, the
validated TLSA lookup of ``_<port>._tcp.mx.sink.test`` (securely absent: the sink, Postfix's
smtp-sink, has no STARTTLS, so what is measured is the lookups, not a handshake). The figures:
``hamta_no_dane_msgs_per_s`` and ``hamta_dane_msgs_per_s`` (end-to-end delivered msg/s).
"""

import subprocess
import time
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
from relay_common import SINK_HOST, BenchError, free_ports, say, scratch_directory, stop_child
from relay_hamta import run_hamta
from relay_load import Result

from cluster.lab.dnssec import ZoneError, sign_zone, unbound_argv, unbound_config, write_zone

RESOLVER_HOST = "127.0.0.153"


def _start_resolver(base: Path) -> tuple[subprocess.Popen[bytes], str]:
    (port,) = free_ports(RESOLVER_HOST, 1, set())
    records = ["sink.test. IN MX 10 mx.sink.test.", f"mx.sink.test. IN A {SINK_HOST}"]
    try:
        signed, anchor = sign_zone("sink.test", write_zone(base, "sink.test", SINK_HOST, records))
        conf = unbound_config(
            base, RESOLVER_HOST, port, [anchor], [("sink.test", signed)], ["127.0.0.0/8"]
        )
    except ZoneError as exc:
        raise BenchError(str(exc)) from None
    with open(base / "unbound.log", "wb") as log:
        proc = subprocess.Popen(unbound_argv(conf), stdout=log, stderr=subprocess.STDOUT)
    query = dns.message.make_query("sink.test", "MX", want_dnssec=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            answer = dns.query.udp(query, RESOLVER_HOST, port=port, timeout=0.2)
            if answer.flags & dns.flags.AD:
                return proc, f"{RESOLVER_HOST}:{port}"
        except (OSError, dns.exception.DNSException):
            pass
        time.sleep(0.05)
    stop_child(proc)
    raise BenchError(f"unbound did not validate sink.test: {(base / 'unbound.log').read_text()}")


def measure_dane(
    messages: int, sessions: int, size: int, **options: Any
) -> dict[str, float | None]:
    """Both runs; their msg/s (None for a run that failed, said on the terminal)."""
    figures: dict[str, float | None] = {}
    with scratch_directory(options.get("workdir"), "hamta-bench-dane-", False) as base:
        proc, nameserver = _start_resolver(base)
        try:
            for name, dnssec in (("no_dane", False), ("dane", True)):
                try:
                    result: Result = run_hamta(
                        messages, sessions, size, dns=(nameserver, dnssec), **options
                    )
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    say(f"hamta {name}: FAILED: {exc}")
                    figures[f"hamta_{name}_msgs_per_s"] = None
                    continue
                ok = not result.problems and result.delivered >= result.submitted
                rate = round(result.msgs_per_s, 1) if ok else None
                figures[f"hamta_{name}_msgs_per_s"] = rate
                say(
                    f"hamta {'with' if dnssec else 'without'} DANE lookups: delivered "
                    f"{result.delivered} in {result.end_to_end_seconds:.2f}s -> "
                    f"{result.msgs_per_s:.1f} msg/s{'' if ok else ' (PROBLEMS: not counted)'}"
                )
        finally:
            stop_child(proc)
    return figures
