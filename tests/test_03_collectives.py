"""What the generic lesson tests don't cover in lesson 03: the --bench sweep on gloo, a bad
--bench-ops, the Ring-vs-Tree script (benchmarks/collectives.py) without GPUs, and the trees
it draws."""

import collections
import importlib.util
import json
import sys

from conftest import ROOT, run_command, run_ranks, text

LESSON_03 = ROOT / "lessons" / "03_collectives.py"
SCRIPT = ROOT / "benchmarks" / "collectives.py"


def test_bench_prints_a_table_checks_the_data_and_saves_plot_and_rows(tmp_path):
    result = run_ranks(LESSON_03, 2, ["--bench", "--out", tmp_path])
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    assert "[rank 0]         op     size    time us  algbw GB/s  busbw GB/s" in out
    assert "[rank 0] checked: all_reduce of 4 MiB gives 2*3/2 in every element" in out
    assert (tmp_path / "03_bandwidth.png").stat().st_size > 0
    saved = json.loads((tmp_path / "03_bandwidth.json").read_text())
    assert (saved["backend"], saved["world_size"]) == ("gloo", 2)
    assert {r["op"] for r in saved["rows"]} == {"all_reduce", "broadcast"}
    for row in saved["rows"]:  # the nccl-tests formulas; 2 ranks: busbw = algbw for both
        assert row["algbw"] == row["bytes"] / row["seconds"] / 1e9
        assert row["busbw"] == row["algbw"]
    four = run_ranks(LESSON_03, 4, ["--bench", "--bench-ops", "all_reduce", "--out", tmp_path])
    rows = json.loads((tmp_path / "03_bandwidth.json").read_text())["rows"]
    assert four.returncode == 0 and {r["op"] for r in rows} == {"all_reduce"}, text(four)
    assert all(abs(r["busbw"] - 1.5 * r["algbw"]) < 1e-9 * r["busbw"] for r in rows)  # 2(n-1)/n


def test_an_unknown_collective_is_a_clear_error_on_every_rank(tmp_path):
    result = run_ranks(
        LESSON_03, 2, ["--bench", "--bench-ops", "all_reduce,allgather", "--out", tmp_path]
    )
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out, out
    for rank in range(2):
        assert (
            f"[rank {rank}] error: --bench-ops all_reduce,allgather: no collective called "
            "allgather. Choose from all_reduce,broadcast."
        ) in out, out


def test_ring_vs_tree_follows_the_ranks_backend_not_the_gpus_it_sees(tmp_path):
    """The parent sees 8 GPUs (faked) but the ranks run gloo (COURSE_BACKEND=gloo): one run, a
    table that names gloo, and no Ring-vs-Tree comparison saved (it used to run three gloo
    sweeps and save them as NCCL's Ring and Tree on any machine with GPUs)."""
    fake = (
        "import runpy, sys, torch; torch.cuda.device_count = lambda: 8; "
        f"sys.argv = ['collectives.py', '--nproc', '2', '--out', {str(tmp_path)!r}]; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    result = run_command([sys.executable, "-c", fake], timeout=180, env={"COURSE_BACKEND": "gloo"})
    out = text(result)
    assert result.returncode == 0, out
    assert "the ranks ran gloo" in out and "One run only." in out, out
    assert out.count("checked: all_reduce of 4 MiB gives 2*3/2") == 1, out
    assert "NCCL_ALGO=Ring" not in out and "NCCL_ALGO=Tree" not in out, out
    assert "all_reduce busbw (GB/s), 2 ranks, gloo on CPU" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["03_algorithms.png", "03_bandwidth.png"]


def test_the_two_trees_of_a_double_binary_tree_share_no_inner_rank():
    spec = importlib.util.spec_from_file_location("collectives_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for n in (2, 4, 8, 16):
        one = bench.tree_parents(n)
        mirrored = {n - 1 - r: n - 1 - p for r, p in one.items()}
        for tree in (one, mirrored):
            root = (set(range(n)) - set(tree)).pop()  # the one rank without a parent
            for rank in range(n):  # every rank reaches the root: a tree, no cycles
                steps = 0
                while rank != root and steps < n:
                    rank, steps = tree[rank], steps + 1
                assert rank == root, (n, tree)
            assert max(collections.Counter(tree.values()).values()) <= 2  # binary
        inner = set(one.values()), set(mirrored.values())  # ranks with children
        assert inner[0] == {r for r in range(n) if r % 2 == 0}  # odd ranks are leaves
        assert not inner[0] & inner[1], (n, inner)  # inside one tree at most: links stay busy
