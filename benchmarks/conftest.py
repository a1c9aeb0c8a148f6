"""Every benchmark here is one side of a comparison: ``ours`` against its ``peer`` measured in the
same run. Tests time their side with :func:`compare`; the ratios are printed after pytest-benchmark's
table. Nothing asserts on time.

pytest-benchmark times each side in its own test, one after the other, and on a shared machine
whose speed drifts (other tenants' jobs) the two medians can come from different weather. So once
both sides of a comparison have run, they also take ``PAIRED_ROUNDS`` turns (``take_turns``) and
the speed-up that counts, the one set against the goal, is the median of the rounds' ratios.
"""
import functools
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gptj_popxl.bench import take_turns  # noqa: E402  (after the path set-up above)

PAIRED_ROUNDS = int(os.environ.get("GPTJ_BENCH_PAIRED_ROUNDS", "20"))
if PAIRED_ROUNDS < 1:
    raise ValueError(f"GPTJ_BENCH_PAIRED_ROUNDS must be at least 1, got {PAIRED_ROUNDS}")
# A turn lasts at least this long (a side calls several times where one call is shorter), so that a
# round's ratio is not the timer's and the scheduler's noise.
MIN_TURN_SECONDS = 0.005

# The side whose pair has not run yet, by comparison: (role, call, median seconds per call).
_WAITING: dict = {}
# Each completed comparison's paired turns: {"ours": seconds per call in each round, "peer": ...}.
_PAIRED: dict = {}


def compare(benchmark, comparison: str, role: str, fn, *args, goal: float = None, items: int = None,
            minus: str = None, minus_label: str = None, minus_goal: float = None, minus_items: int = None) -> None:
    """Times ``fn(*args)`` with ``benchmark`` as the ``role`` ('ours' or 'peer') side of ``comparison``;
    after the second side, the two take turns (see the module docstring), so both must still be
    callable then (sessions attached by module fixtures, not by the test).

    ``goal``: the wanted speed-up of ours over the peer; ``items``: work per call (tokens), for a rate.
    ``minus``: another comparison whose time is part of this one's (a generate's prefill): the
    summary also compares the difference, named ``minus_label``, with ``minus_goal`` and ``minus_items``.
    """
    if role not in ("ours", "peer"):
        raise ValueError(f"role must be 'ours' or 'peer', got {role!r}")
    benchmark.group = comparison
    benchmark.extra_info.update(role=role, goal=goal, items=items, minus=minus, minus_label=minus_label,
                                minus_goal=minus_goal, minus_items=minus_items)
    benchmark(fn, *args)
    if benchmark.stats is None:  # --benchmark-disable: nothing timed
        return
    call, median = functools.partial(fn, *args), benchmark.stats.stats.median
    other = _WAITING.pop(comparison, None)
    if other is None or other[0] == role:
        _WAITING[comparison] = (role, call, median)
        return
    calls = {role: call, other[0]: other[1]}
    faster = max(min(median, other[2]), 1e-9)
    _PAIRED[comparison] = take_turns(calls, PAIRED_ROUNDS, max(1, math.ceil(MIN_TURN_SECONDS / faster)))


@pytest.fixture(autouse=True, scope="module")
def _forget_unpaired():
    """A side whose pair did not run in its module (deselected, failed) is dropped with the module's
    fixtures: its call would hold them, or call a closed session."""
    yield
    _WAITING.clear()


def _line(name: str, t_ours: float, t_peer: float, items, goal, paired=None, separate=None) -> str:
    """One comparison: times per call, the speed-up (the rounds' median ratio and its middle half
    when ``paired``, (ours, peer) seconds per round) and pytest-benchmark's ``separate`` medians' ratio."""
    line = f"{name}: ours {t_ours * 1e3:.3f} ms, peer {t_peer * 1e3:.3f} ms (ours - peer {(t_ours - t_peer) * 1e6:.1f} us), "
    if paired is not None:
        ratios = paired[1] / paired[0]
        low, mid, high = np.percentile(ratios, [25, 50, 75])
        line += f"speed-up {mid:.2f}x (median of {len(ratios)} paired rounds, middle half {low:.2f}-{high:.2f}x)"
    else:
        line += f"speed-up {t_peer / t_ours:.2f}x"
    if separate is not None:
        line += f" [pytest-benchmark's separate medians: {separate:.2f}x]"
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
    rows = [(name, pair["ours"], pair["peer"]) for name, pair in sides.items()
            if len(pair) == 2 and name in _PAIRED]
    if not rows:
        return
    terminalreporter.section("speed-up of ours over the peer (the two sides taking turns, same run)")
    for name, ours, peer in rows:
        info, turns = ours.extra_info, _PAIRED[name]
        t_ours, t_peer = np.median(turns["ours"]), np.median(turns["peer"])
        terminalreporter.write_line(_line(name, t_ours, t_peer, info.get("items"), info.get("goal"),
                                          (turns["ours"], turns["peer"]), peer.stats.median / ours.stats.median))
        part = _PAIRED.get(info.get("minus"))
        if part is not None:
            # Different comparisons' rounds are not pairs: the difference of the medians.
            terminalreporter.write_line(_line(f"{name}, {info['minus_label']}", t_ours - np.median(part["ours"]),
                                              t_peer - np.median(part["peer"]), info.get("minus_items"),
                                              info.get("minus_goal")))
