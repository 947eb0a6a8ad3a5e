"""The benchmark scripts' trace summaries (scripts/bench_train.py): what the GPU's idle time is made of."""
from scripts.bench_train import busy_and_gaps, idle_gaps


def test_busy_time_is_the_union_of_the_kernels_and_the_gaps_name_their_neighbours():
    # (start, end, name) in us: b overlaps a, c runs inside b, d starts 5 us after b ends, e 300 us after d.
    spans = [(0, 10, "a"), (8, 20, "b"), (12, 15, "c"), (25, 30, "d"), (330, 340, "e")]
    busy, gaps = busy_and_gaps(spans[::-1])
    assert busy == 20 + 5 + 10
    assert gaps == [(5, 25, "b", "d"), (300, 330, "d", "e")]
    summary = idle_gaps(gaps, spans, top=1)
    assert summary["idle_ms_by_gap"] == {"<10us": [0.005, 1], "10-100us": [0.0, 0], "100us-1ms": [0.3, 1],
                                         ">1ms": [0.0, 0]}
    assert summary["largest_gaps"] == [(300, 0.33, "d", "e")]
    assert summary["idle_ms_after"] == [("d", 0.3, 1)]


def test_the_peers_lines_name_the_versions_they_import():
    """peer_versions reads the packages' metadata without importing them: the versions a peer's process imports
    (a machine may carry a newer transformers beside its own; the raw lines must say which one ran)."""
    import peft
    import transformers

    from scripts.bench_common import peer_versions
    found = peer_versions()
    assert found["transformers"] == transformers.__version__ and found["peft"] == peft.__version__
