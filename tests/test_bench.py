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
