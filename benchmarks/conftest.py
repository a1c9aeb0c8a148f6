"""Every benchmark here is one side of a comparison: ``ours`` against its ``peer`` measured in the
same run. Tests tag themselves with :func:`compare`; the ratios are printed after pytest-benchmark's
table. Nothing asserts on time."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def compare(benchmark, comparison: str, role: str, goal: float = None, items: int = None) -> None:
    """Tags ``benchmark`` as the ``role`` ('ours' or 'peer') side of ``comparison``.

    ``goal``: the wanted speed-up of ours over the peer; ``items``: work per call (tokens), for a rate.
    """
    if role not in ("ours", "peer"):
        raise ValueError(f"role must be 'ours' or 'peer', got {role!r}")
    benchmark.group = comparison
    benchmark.extra_info.update(role=role, goal=goal, items=items)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    sides = {}
    for bench in session.benchmarks:
        role = bench.extra_info.get("role")
        if role is not None and bench.stats is not None:
            sides.setdefault(bench.group, {})[role] = bench
    rows = [(name, pair["ours"], pair["peer"]) for name, pair in sides.items() if len(pair) == 2]
    if not rows:
        return
    terminalreporter.section("speed-up of ours over the peer (median times, same run)")
    for name, ours, peer in rows:
        t_ours, t_peer = ours.stats.median, peer.stats.median
        line = (f"{name}: ours {t_ours * 1e3:.3f} ms, peer {t_peer * 1e3:.3f} ms (ours - peer "
                f"{(t_ours - t_peer) * 1e6:.1f} us), speed-up {t_peer / t_ours:.2f}x")
        items = ours.extra_info.get("items")
        if items:
            line += f" ({items / t_ours:.0f} vs {items / t_peer:.0f} items/s)"
        goal = ours.extra_info.get("goal")
        if goal is not None:
            line += f"; goal >= {goal}x"
        terminalreporter.write_line(line)
