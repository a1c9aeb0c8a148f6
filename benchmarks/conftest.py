"""Every benchmark here is one side of a comparison: ``ours`` against its ``peer`` measured in the
same run. Tests tag themselves with :func:`compare`; the ratios are printed after pytest-benchmark's
table. Nothing asserts on time."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def compare(benchmark, comparison: str, role: str, goal: float = None, items: int = None,
            minus: str = None, minus_label: str = None, minus_goal: float = None, minus_items: int = None) -> None:
    """Tags ``benchmark`` as the ``role`` ('ours' or 'peer') side of ``comparison``.

    ``goal``: the wanted speed-up of ours over the peer; ``items``: work per call (tokens), for a rate.
    ``minus``: another comparison whose time is part of this one's (a generate's prefill): the
    summary also compares the difference, named ``minus_label``, with ``minus_goal`` and ``minus_items``.
    """
    if role not in ("ours", "peer"):
        raise ValueError(f"role must be 'ours' or 'peer', got {role!r}")
    benchmark.group = comparison
    benchmark.extra_info.update(role=role, goal=goal, items=items, minus=minus, minus_label=minus_label,
                                minus_goal=minus_goal, minus_items=minus_items)


def _line(name: str, t_ours: float, t_peer: float, items, goal, fastest=None) -> str:
    line = (f"{name}: ours {t_ours * 1e3:.3f} ms, peer {t_peer * 1e3:.3f} ms (ours - peer "
            f"{(t_ours - t_peer) * 1e6:.1f} us), speed-up {t_peer / t_ours:.2f}x")
    if fastest is not None:
        # The sides run one after the other: a busy spell of a shared machine slows one side's
        # median; each side's fastest round is what a quiet machine gives.
        line += f" (fastest rounds: {fastest[1] / fastest[0]:.2f}x)"
    if items:
        line += f" ({items / t_ours:.0f} vs {items / t_peer:.0f} items/s)"
    if goal is not None:
        line += f"; goal >= {goal}x"
    return line


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
    terminalreporter.section("speed-up of ours over the peer (median times, same run; and of the fastest rounds)")
    for name, ours, peer in rows:
        info = ours.extra_info
        terminalreporter.write_line(_line(name, ours.stats.median, peer.stats.median, info.get("items"),
                                          info.get("goal"), (ours.stats.min, peer.stats.min)))
        part = sides.get(info.get("minus"), {})
        if len(part) == 2:
            t_ours, t_peer = (ours.stats.median - part["ours"].stats.median,
                              peer.stats.median - part["peer"].stats.median)
            terminalreporter.write_line(_line(f"{name}, {info['minus_label']}", t_ours, t_peer,
                                              info.get("minus_items"), info.get("minus_goal")))
