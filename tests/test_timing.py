"""replacer.metrics.timing: calls compared with each other are timed in turns, so drift hits all alike."""

from __future__ import annotations

from replacer.metrics.timing import interleaved_median_ms, median_ms


def test_calls_are_timed_in_rotating_turns():
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("teacher", "fused", "loop")}
    times = interleaved_median_ms(calls, repeats=4, warmup=1)
    assert set(times) == set(calls) and all(t >= 0 for t in times.values())
    assert order[:3] == ["teacher", "fused", "loop"]  # one warm-up call each
    rounds = [order[3 + 3 * r : 6 + 3 * r] for r in range(4)]
    assert rounds == [["teacher", "fused", "loop"], ["fused", "loop", "teacher"], ["loop", "teacher", "fused"],
                      ["teacher", "fused", "loop"]]


def test_a_single_call_is_timed_repeats_times_after_its_warm_up():
    count = []
    median_ms(lambda: count.append(1), repeats=5, warmup=2)
    assert len(count) == 7
