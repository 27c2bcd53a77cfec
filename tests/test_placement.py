"""Budget arithmetic (pure)."""

from model_supervisor.scheduler.placement import Budget, Candidate, choose_victims, eviction_order, foreign_usage


def test_usable_is_total_less_reserve_and_foreign_never_negative():
    assert Budget(total_mb=24_000, used_mb=9000, reserve_mb=1024, foreign_mb=3000).usable_mb == 19_976
    assert Budget(total_mb=1000, used_mb=0, reserve_mb=800, foreign_mb=900).usable_mb == 0


def test_foreign_usage_with_per_process_figures():
    process_mb = {10: 5000, 11: 700, 20: 3000, 99: 1200}
    # children 10 and 11; lease holder 20 leased 2000 but holds 3000: the extra 1000 is as foreign as pid 99.
    assert foreign_usage(9900, 0, process_mb, model_pids=[10, 11], lease_pids={20: 2000}) == 2200


def test_foreign_usage_without_per_process_figures_subtracts_commitments():
    assert foreign_usage(used_mb=9000, committed_mb=6000, process_mb=None, model_pids=[], lease_pids={}) == 3000
    assert foreign_usage(used_mb=2000, committed_mb=6000, process_mb=None, model_pids=[], lease_pids={}) == 0


def test_eviction_order_idle_first_then_priority_then_least_recently_used():
    candidates = [
        Candidate("busy-low", 1000, priority=0, last_used=1, busy=True),
        Candidate("idle-high", 1000, priority=9, last_used=1, busy=False),
        Candidate("idle-low-recent", 1000, priority=0, last_used=50, busy=False),
        Candidate("idle-low-old", 1000, priority=0, last_used=10, busy=False),
    ]
    assert [c.name for c in eviction_order(candidates)] == ["idle-low-old", "idle-low-recent", "idle-high", "busy-low"]


def test_choose_victims_takes_the_shortest_prefix_that_frees_enough():
    candidates = [Candidate("a", 3000, 0, 1, False), Candidate("b", 3000, 0, 2, False), Candidate("c", 3000, 1, 0, False)]
    assert [c.name for c in choose_victims(4000, candidates)] == ["a", "b"]
    assert choose_victims(0, candidates) == []
    assert choose_victims(10_000, candidates) is None
