"""The lab's outbound TLS policies: a CA, signed zones for DANE, an MTA-STS policy.

On the internet host, next to dnsmasq (which the client and the monitors keep using), unbound
on ``RESOLVER_PORT`` validates and serves the zones the pair's relays resolve through
(``[dns] dnssec = true``):

- ``lab.test`` (unsigned, insecure): the records dnsmasq serves, and ``sts.lab.test``, whose
  ``enforce`` MTA-STS policy the policy host (cluster.lab.policy_host) serves on port 443;
- ``dane.lab.test`` (signed): its MX publishes a TLSA 3 1 1 record matching the sink's key;
- ``badtlsa.lab.test`` (signed): its MX publishes a TLSA record that matches nothing.

The sink offers STARTTLS with a certificate of the lab's CA naming every MX; the relays trust
that CA (``[tls_policy] ca_file``). Everything is made under ``<lab>/inet/tls`` by ``prepare``.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cluster.lab import dnssec
from cluster.lab.topology import (
    DOMAIN,
    HOSTS,
    INTERNET,
    MAIL_DOMAINS,
    MX_NAME,
    PROBE_DOMAIN,
    RESOLVER_PORT,
    SMTP_PORT,
    Topology,
)

POLICY_PORT: Final = 443
DANE_DOMAIN: Final = "dane.lab.test"
BAD_TLSA_DOMAIN: Final = "badtlsa.lab.test"
STS_DOMAIN: Final = "sts.lab.test"
TLS_DOMAINS: Final = (DANE_DOMAIN, BAD_TLSA_DOMAIN, STS_DOMAIN)
STS_POLICY: Final = f"version: STSv1\nmode: enforce\nmx: mx.{STS_DOMAIN}\nmax_age: 86400\n"


@dataclass(frozen=True, slots=True)
class TlsSite:
    """The files ``prepare`` made: the CA the relays trust, the sink's and policy host's keys,
    unbound's configuration, and the directory of the policies (``<domain>.txt``)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def sink_chain(self) -> Path:
        return self.directory / "sink.chain.crt"

    @property
    def sink_key(self) -> Path:
        return self.directory / "sink.key"

    @property
    def policy_cert(self) -> Path:
        return self.directory / "policy.crt"

    @property
    def policy_key(self) -> Path:
        return self.directory / "policy.key"

    @property
    def policies(self) -> Path:
        return self.directory / "policies"

    @property
    def unbound_conf(self) -> Path:
        return self.directory / "unbound.conf"


def _openssl(directory: Path, *args: str) -> None:
    try:
        subprocess.run(
            ["openssl", *args],
            cwd=directory,
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise dnssec.ZoneError(f"openssl {args[0]}: {exc}") from None


# A new P-256 key: made in milliseconds, where RSA would slow every lab start and test.
_P256: Final = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def make_ca(directory: Path, name: str = "hamta lab CA") -> tuple[Path, Path]:
    """A P-256 CA in ``directory``: ``ca.crt`` and ``ca.key``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.crt", directory / "ca.key"
    _openssl(
        directory,
        "req",
        "-x509",
        "-nodes",
        "-days",
        "365",
        "-subj",
        f"/CN={name}",
        *_P256,
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return cert, key


def issue(directory: Path, name: str, names: Sequence[str]) -> tuple[Path, Path, Path]:
    """A P-256 server certificate for ``names`` signed by ``directory``'s CA (make_ca):
    ``(<name>.crt, <name>.key, <name>.chain.crt)``, the chain being the leaf then the CA."""
    key, csr, ext = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.ext"
    cert, chain = directory / f"{name}.crt", directory / f"{name}.chain.crt"
    _openssl(
        directory,
        "req",
        "-new",
        "-nodes",
        "-subj",
        f"/CN={names[0]}",
        *_P256,
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(f'DNS:{n}' for n in names)}\n"
    )
    _openssl(
        directory,
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(directory / "ca.crt"),
        "-CAkey",
        str(directory / "ca.key"),
        "-CAcreateserial",
        "-days",
        "365",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    chain.write_bytes(cert.read_bytes() + (directory / "ca.crt").read_bytes())
    return cert, key, chain


def spki_sha256(cert: Path) -> str:
    """The TLSA 3 1 1 data of a PEM certificate: SHA-256 of its SubjectPublicKeyInfo."""
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    spki = loaded.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def prepare(directory: Path, topology: Topology) -> TlsSite:
    """Make the CA, the certificates, the zones (two signed) and unbound's configuration."""
    site = TlsSite(directory)
    make_ca(directory)
    mx_names = [MX_NAME, *(f"mx.{domain}" for domain in TLS_DOMAINS)]
    issue(directory, "sink", mx_names)
    issue(directory, "policy", [f"mta-sts.{STS_DOMAIN}"])
    site.policies.mkdir(exist_ok=True)
    (site.policies / f"{STS_DOMAIN}.txt").write_text(STS_POLICY)

    inet = str(topology.address(INTERNET))
    tlsa = f"_{SMTP_PORT}._tcp"
    # The monitors' round-trip probes go to PROBE_DOMAIN (cluster.lab.monitors), as in dnsmasq.
    plain = [f"{domain}. IN MX 10 {MX_NAME}." for domain in (*MAIL_DOMAINS, PROBE_DOMAIN)]
    plain += [f"{MX_NAME}. IN A {inet}"]
    plain += [f"{host}.{DOMAIN}. IN A {topology.address(host)}" for host in HOSTS]
    plain += [f"{name}. IN A {address}" for address, name in topology.egress]
    plain += [
        f"{STS_DOMAIN}. IN MX 10 mx.{STS_DOMAIN}.",
        f"mx.{STS_DOMAIN}. IN A {inet}",
        f'_mta-sts.{STS_DOMAIN}. IN TXT "v=STSv1; id=lab1"',
        f"mta-sts.{STS_DOMAIN}. IN A {inet}",
        f'_smtp._tls.{STS_DOMAIN}. IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{MAIL_DOMAINS[0]}"',
    ]
    digest = spki_sha256(directory / "sink.crt")
    zones = [(DOMAIN, dnssec.write_zone(directory, DOMAIN, inet, plain))]
    # The egress addresses' PTRs (forward-confirmed: the relays check them at start), in the
    # reverse zone of the /24 that holds them.
    reverse = ".".join(str(topology.egress[0][0]).split(".")[2::-1]) + ".in-addr.arpa"
    pointers = [f"{address.reverse_pointer}. IN PTR {name}." for address, name in topology.egress]
    zones.append((reverse, dnssec.write_zone(directory, reverse, inet, pointers)))
    anchors = []
    for domain, data in ((DANE_DOMAIN, digest), (BAD_TLSA_DOMAIN, "00" * 32)):
        records = [
            f"{domain}. IN MX 10 mx.{domain}.",
            f"mx.{domain}. IN A {inet}",
            f"{tlsa}.mx.{domain}. IN TLSA 3 1 1 {data}",
        ]
        signed, anchor = dnssec.sign_zone(
            domain, dnssec.write_zone(directory, domain, inet, records)
        )
        zones.append((domain, signed))
        anchors.append(anchor)
    dnssec.unbound_config(
        directory, inet, RESOLVER_PORT, anchors, zones, [str(topology.subnet), "127.0.0.0/8"]
    )
    return site
