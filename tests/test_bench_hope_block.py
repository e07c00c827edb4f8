"""The HOPE block benchmark runs its own rows at tiny shapes and hands an external package's
timings back from its subprocess (a stand-in package here; the real checkouts are not needed)."""

import math
import textwrap

from nested_learning.benchmark import hope_block

TINY = dict(batch=2, seq_len=16, dim=8, heads=2, chunk_sizes=(4, 8), titans_batch=1, titans_seq_len=8,
            titans_dim=8, titans_heads=2, titans_chunks=(2, 4), repeats=2, warmup=0)
KEYS = {"group", "id", "implementation", "config", "shape", "dtype", "device", "threads", "runs", "median_ms",
        "min_ms", "max_ms", "tokens_per_s", "compared_with", "ours_speedup"}


def test_our_rows_are_well_formed():
    rows = hope_block.run(**TINY)
    assert [r["id"] for r in rows] == ["1a", "1b", "1e", "1f", "2-ours-C2", "2-ours-C4"]
    for r in rows:
        assert KEYS <= r.keys() and "error" not in r
        assert r["dtype"] == "fp32" and r["runs"] == 2 and r["threads"] >= 1
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert math.isclose(r["tokens_per_s"], int(r["shape"].split()[0][2:]) * int(r["shape"].split()[1][2:])
                            / (r["median_ms"] / 1e3))
    assert rows[0]["shape"] == rows[2]["shape"] == "B=2 T=16 d=8" and rows[4]["shape"] == "B=1 T=8 d=8"
    assert rows[0]["ours_speedup"] == 1.0 and rows[1]["compared_with"] == "1a" and rows[1]["ours_speedup"] > 0
    assert "use_backend('reference')" in rows[1]["implementation"] and "memory_chunk_size=4" in rows[5]["config"]
    assert "use_self_modification=False" in rows[3]["config"] and rows[3]["compared_with"] == "1f"
    table = hope_block.format_table(rows)
    assert table.startswith("| row |") and "| 2-ours-C4 |" in table


def test_external_rows_come_back_from_a_subprocess(tmp_path):
    pkg = tmp_path / "src" / "nested_learning"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "hope.py").write_text(textwrap.dedent("""
        import torch

        class HOPEBlock(torch.nn.Module):
            def __init__(self, dim, n_heads, chunk_sizes, dropout, use_self_modification):
                super().__init__()
                self.proj = torch.nn.Linear(dim, dim)

            def forward(self, x):
                return self.proj(x)
    """))
    rows = hope_block.run(**{**TINY, "titans_chunks": (2,)}, reference_library=str(tmp_path),
                          peer=str(tmp_path / "missing"))
    by_id = {r["id"]: r for r in rows}
    stand_in = by_id["1c"]
    assert "error" not in stand_in and stand_in["runs"] == 2 and stand_in["median_ms"] > 0
    assert stand_in["config"].startswith("HOPEBlock(dim=8, n_heads=2, chunk_sizes=[4, 8]")
    assert stand_in["ours_speedup"] > 0 and stand_in["compared_with"] == "1e"
    assert by_id["1g"]["compared_with"] == "1f" and "use_self_modification=False" in by_id["1g"]["config"]
    for rid in ("1d", "1d-read", "2-peer-C2", "2-peer-default"):  # no checkout there: rows say why
        assert by_id[rid]["median_ms"] is None and "no package" in by_id[rid]["error"]
    assert "not run: no package" in hope_block.format_table(rows)
