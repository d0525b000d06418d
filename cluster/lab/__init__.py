"""hamta's lab: a real cluster on one Linux host, built from network namespaces.

``hamta lab up`` builds it (three ZooKeeper servers, two nodes with their agents, a mail client,
DNS and a recording mail sink, a shared disk), ``hamta lab down`` takes it away. Tests,
benchmarks and the chaos suite drive it through :class:`cluster.lab.lab.Lab`.

This file imports nothing: ``python -m cluster.lab.fence``, the lab's STONITH, runs inside every
takeover and must start on the standard library alone (its docstring says why).
"""
