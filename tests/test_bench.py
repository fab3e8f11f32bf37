import json

from fcnfast import bench


def test_bench_quick_rows_and_table(tmp_path):
    result = bench.run(["skip"], classes=[21], batches=[1], min_time=0.01, memory=True, quick=True,
                       echo=lambda *a: None)
    names = [r["case"] for r in result["rows"]]
    assert names == ["score_skip pool4 fwd", "score_skip pool3 fwd", "skip_add_crop pool3 fwd"]
    for row in result["rows"]:
        assert row["torch_ms"] > 0 and row["fcnfast_ms"] > 0
        assert abs(row["ratio"] - row["torch_ms"] / row["fcnfast_ms"]) < 1e-9
        assert row["fcnfast_peak_mb"] > 0  # the output alone is allocated
    table = bench.format_table(result["rows"])
    assert table.count("\n") == 2 + len(names) - 1
    json.dumps(result)  # serialisable


def test_peak_memory_counts_the_output():
    import torch
    peak = bench.peak_memory(lambda: torch.empty(1 << 20))
    assert peak >= 4 * (1 << 20)


def test_profiler_output_stays_out_of_stderr(capfd):
    import torch
    bench.peak_memory(lambda: torch.empty(1 << 16) + 1)
    captured = capfd.readouterr()
    assert captured.err == ""


def test_busy_machine_warning_from_the_spread_of_baseline_timings(capfd):
    assert bench.busy_warning([1.05, 1.2, 1.1]) is None
    text = bench.busy_warning([1.05, 40.0 / 0.5, 1.1])
    assert text.startswith("fcnfast: warning: the machine looks busy") and "80.0x" in text
    spread = []

    def slow_then_fast(state={"n": 0}):
        state["n"] += 1
        if state["n"] < 8:  # the first round is slow: a busy machine
            import time
            time.sleep(0.02)
    bench.compare_times(slow_then_fast, lambda: None, min_time=0.0, min_reps=3, rounds=3,
                        spread=spread)
    assert spread and spread[0] > bench.BUSY_SPREAD


def test_bench_crf_group_vs_pydensecrf(capfd):
    """The crf group times pydensecrf against dense_crf, or is skipped with a note without it."""
    try:
        import pydensecrf.densecrf  # noqa: F401
        have = True
    except ImportError:
        have = False
    result = bench.run(["crf"], classes=[3], batches=[1, 2], min_time=0.01, memory=False,
                       quick=True, echo=lambda *a: None)
    if have:
        assert [r["case"] for r in result["rows"]] == ["dense_crf 320x240 5 it"]
        row = result["rows"][0]
        assert row["baseline"] == "pydensecrf" and row["N"] == 1
        assert row["torch_ms"] > 0 and row["fcnfast_ms"] > 0
    else:
        assert result["rows"] == []
        assert "pydensecrf is not installed" in capfd.readouterr().err
