import json

from fcnfast import bench


def test_bench_quick_rows_and_table(tmp_path):
    result = bench.run(
        ["skip"],
        classes=[21],
        batches=[1],
        min_time=0.01,
        memory=True,
        quick=True,
        echo=lambda *a: None,
    )
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
    state = {"n": 0}

    def slow_then_fast():
        state["n"] += 1
        if state["n"] < 8:  # the first round is slow: a busy machine
            import time

            time.sleep(0.02)

    bench.compare_times(
        slow_then_fast, lambda: None, min_time=0.0, min_reps=3, rounds=3, spread=spread
    )
    assert spread and spread[0] > bench.BUSY_SPREAD


def test_bench_crf_group_vs_pydensecrf(capfd):
    """The crf group times pydensecrf against dense_crf, or is skipped with a note without it."""
    try:
        import pydensecrf.densecrf  # noqa: F401

        have = True
    except ImportError:
        have = False
    result = bench.run(
        ["crf"],
        classes=[3],
        batches=[1, 2],
        min_time=0.01,
        memory=False,
        quick=True,
        echo=lambda *a: None,
    )
    if have:
        assert [r["case"] for r in result["rows"]] == ["dense_crf 320x240 5 it"]
        row = result["rows"][0]
        assert row["baseline"] == "pydensecrf" and row["N"] == 1
        assert row["torch_ms"] > 0 and row["fcnfast_ms"] > 0
    else:
        assert result["rows"] == []
        assert "pydensecrf is not installed" in capfd.readouterr().err


def test_cold_calls_rows_fields_and_table():
    """``fcnfast bench --cold``: fresh processes per side; fields and table shape, not speed."""
    cases = (
        ("bilinear", "bilinear_upsample2d x8 fwd", "PyTorch"),
        ("bilinear", "bilinear_upsample2d x8 fwd", "F.interpolate"),
    )
    result = bench.run_cold(
        classes=[3], batches=[1], procs=2, calls=3, threads=1, cases=cases, echo=lambda *a: None
    )
    rows = result["rows"]
    assert [(r["case"], r["baseline"]) for r in rows] == [c[1:] for c in cases]
    for row in rows:
        assert (row["C"], row["N"], row["procs"], row["calls"]) == (3, 1, 2, 3)
        for side in ("torch", "fcnfast"):
            first, median, p99, top = (
                row["%s_%s_ms" % (side, k)] for k in ("first", "median", "p99", "max")
            )
            assert 0 < median <= p99 <= top and 0 < first <= row["%s_first_max_ms" % side] <= top
    # the fcnfast side of both bilinear rows is one series, timed once
    assert rows[0]["fcnfast_median_ms"] == rows[1]["fcnfast_median_ms"]
    assert isinstance(result["thp"], str)
    table = bench.format_cold_table(rows)
    assert table.count("\n") == 2 + len(rows) - 1 and "first / median" in table
    json.dumps(result)


def test_cold_stats_and_percentile():
    assert bench.percentile([5, 1, 3, 2, 4], 50) == 3
    assert bench.percentile(list(range(1, 101)), 99) == 99
    assert bench.percentile([7.0], 99) == 7.0
    stats = bench.cold_stats([[0.010, 0.001, 0.001], [0.020, 0.002, 0.001]])
    assert stats["first_ms"] == 15.0 and stats["first_max_ms"] == 20.0
    assert stats["median_ms"] == 1.0 and stats["p99_ms"] == 2.0 and stats["max_ms"] == 20.0


def test_cold_cli_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench.register_cli(parser.add_subparsers())
    monkeypatch.setattr(bench, "COLD_CASES", bench.COLD_CASES[:1])
    calls = {}

    def fake_run_cold(classes, batches, procs, ncalls, threads):
        calls.update(classes=classes, batches=batches, procs=procs, calls=ncalls)
        row = {
            "case": "bilinear_upsample2d x8 fwd",
            "C": 21,
            "N": 1,
            "baseline": "PyTorch",
            "procs": procs,
            "calls": ncalls,
        }
        for side in ("torch", "fcnfast"):
            row.update(
                {
                    "%s_%s" % (side, k): 1.0
                    for k in ("first_ms", "first_max_ms", "median_ms", "p99_ms", "max_ms")
                }
            )
        return {"machine": "m", "thp": "enabled=madvise defrag=madvise", "rows": [row]}

    monkeypatch.setattr(bench, "run_cold", fake_run_cold)
    js, md = tmp_path / "c.json", tmp_path / "c.md"
    args = parser.parse_args(
        [
            "bench",
            "--cold",
            "--cold-procs",
            "2",
            "--cold-calls",
            "4",
            "--classes",
            "21",
            "--batch",
            "1",
            "--json",
            str(js),
            "--markdown",
            str(md),
        ]
    )
    assert args.func(args) == 0
    assert calls == {"classes": [21], "batches": [1], "procs": 2, "calls": 4}
    assert json.loads(js.read_text())["rows"][0]["fcnfast_p99_ms"] == 1.0
    assert "transparent huge pages enabled=madvise" in md.read_text()
