"""benchmarks/_harness.py and benchmarks/summary.py: rotation, medians and ratios on scripted clocks (no timing is
asserted), provenance of the results files, and the generated table in BENCHMARKS.md."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = _load("_harness")
summary = _load("summary")


def test_rotated_starts_each_round_one_later():
    names = ["a", "b", "c"]
    assert [harness.rotated(names, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                            ["a", "b", "c"]]


def test_compare_rotates_and_takes_medians_of_scripted_times(monkeypatch):
    """A fake clock: each configuration's call returns the next of its scripted (cpu, wall) times, and the order
    of calls is recorded. Round 1's times of 'slow' are doubled (a slow patch of the machine hit it) and the ratio
    is the median over rounds, so it stays 3."""
    order: list[str] = []
    scripted = {
        # 2 rounds x 3 repeats each; medians per round: ref (1, 2) then (2, 4); slow (3, 3) then (6, 6)
        "ref": iter([(1.0, 2.0), (5.0, 9.0), (0.5, 1.0), (2.0, 4.0), (2.0, 4.0), (9.0, 1.0)]),
        "slow": iter([(3.0, 3.0), (3.0, 3.0), (4.0, 1.0), (6.0, 6.0), (1.0, 6.0), (7.0, 7.0)]),
    }
    calls = {"ref": 0, "slow": 0}

    def make(name):
        def fn():
            calls[name] += 1
        fn.name = name
        return fn

    def fake_time_once(fn):
        order.append(fn.name)
        return next(scripted[fn.name])

    monkeypatch.setattr(harness, "time_once", fake_time_once)
    out = harness.compare({"ref": make("ref"), "slow": make("slow")}, "ref", rounds=2, repeats=3, warmup=2)
    assert calls == {"ref": 2, "slow": 2}  # the warm-up calls are not timed
    assert order == ["ref"] * 3 + ["slow"] * 3 + ["slow"] * 3 + ["ref"] * 3  # round 1 starts from the 2nd
    assert out["slow"]["ratios"] == [3.0, 3.0] and out["slow"]["ratio"] == 3.0
    assert out["slow"]["spread"] == [3.0, 3.0]
    assert out["slow"]["cpu_s"] == 4.5 and out["ref"]["cpu_s"] == 1.5  # medians over rounds
    assert out["slow"]["ratio_wall"] == 1.5
    assert out["ref"]["ratio"] == 1.0
    with pytest.raises(ValueError, match="reference 'nope'"):
        harness.compare({"ref": make("ref")}, "nope", rounds=1, repeats=1)


def test_compare_measured_uses_returned_times_and_per_name_references():
    runs = iter(range(100))

    def run(base):
        def fn():
            k = next(runs)
            return {f"{base}": (base_times[base] * (1 + k % 2), 1.0), f"{base} [mean]": (2 * base_times[base], 1.0)}
        return fn

    base_times = {"none": 1.0, "cb": 1.5}
    out = harness.compare_measured({"none": run("none"), "cb": run("cb")},
                                   {"none": "none", "cb": "none", "none [mean]": "none [mean]",
                                    "cb [mean]": "none [mean]"}, rounds=2)
    # round 0: none (k=0) 1.0, cb (k=1) 3.0; round 1 rotated: cb (k=2) 1.5, none (k=3) 2.0
    assert out["cb"]["ratios"] == [3.0, 0.75]
    assert out["cb"]["ratio"] == pytest.approx(1.875)
    assert out["cb [mean]"]["ratio"] == 1.5 and out["cb [mean]"]["reference"] == "none [mean]"
    with pytest.raises(ValueError, match="clock"):
        harness.summarize_rounds([{"a": (1.0, 1.0)}], "a", clock="gpu")
    with pytest.raises(ValueError, match="not one of the measured names"):
        harness.summarize_rounds([{"a": (1.0, 1.0)}], "b")


def test_step_clock_times_between_step_starts():
    clock = harness.StepClock()

    class Trainer:
        accumulate_grad_batches = 2

    for batch_idx in range(7):  # steps start at micro-batches 0, 2, 4, 6
        clock.on_train_batch_start(Trainer(), None, None, batch_idx)
    assert len(clock.steps()) == 3 and len(clock.steps(skip=1)) == 2
    assert all(cpu >= 0 and wall >= 0 for cpu, wall in clock.steps())
    with pytest.raises(ValueError, match="no timed steps"):
        clock.median(skip=4)


def test_write_results_and_save_results_record_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    path = harness.write_results("demo", {"x": 1}, command="python demo.py", packages=("pytest", "no-such-pkg"))
    payload = json.loads(path.read_text())
    assert path == tmp_path / "results" / "demo.json"
    assert payload["benchmark"] == "demo" and payload["command"] == "python demo.py"
    assert len(payload["git_sha"]) == 40 and isinstance(payload["git_dirty"], bool)
    assert payload["versions"]["pytest"] == pytest.__version__ and payload["versions"]["no-such-pkg"] is None
    assert {"python", "torch"} <= set(payload["versions"])
    assert {"platform", "cpu", "cpu_count", "torch_threads", "gpu"} <= set(payload["machine"])
    assert payload["date"][:2] == "20" and payload["figures"] == {"x": 1}

    parser = argparse.ArgumentParser()
    harness.add_output_options(parser)
    row = harness.summary_row("step time", "2 ms", "none, 1 ms", 2.0, "≤ 3×", spread=[1.5, 2.5])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    quick = harness.save_results("demo", {"y": 2}, parser.parse_args(["--quick"]), summary=[row])
    assert quick.parent.parent == tmp_path / "tmp"  # --quick alone: a fresh temporary directory
    chosen = harness.save_results("demo", {"y": 2}, parser.parse_args(["--results-dir", str(tmp_path / "r")]),
                                  summary=[row])
    payload = json.loads(chosen.read_text())
    assert chosen == tmp_path / "r" / "demo.json"
    assert payload["summary"] == [{"benchmark": "demo", **row}] and "lightning_sgd" in payload["versions"]
    assert payload["command"].removeprefix(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} ").startswith(
        "python ")


def _results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    results.mkdir()
    base = {"date": "2026-11-30T16:00:00+00:00", "git_sha": "abcdef0123456789", "git_dirty": False,
            "command": "python b.py"}
    (results / "b.json").write_text(json.dumps({**base, "benchmark": "b", "figures": {}, "summary": [
        {"benchmark": "b", "what": "step", "ours": "2 ms", "anchor": "plain, 1 ms", "ratio": 2.0, "target": "≤ 3×",
         "spread": [1.5, 2.25]},
        {"benchmark": "b wide", "what": "a|b", "ours": "x", "anchor": "", "ratio": None, "target": ""}]}))
    (results / "a.json").write_text(json.dumps({**base, "git_dirty": True, "benchmark": "a",
                                                "figures": {"summary": [{"what": "memory", "ratio": "n/a"}]}}))
    (results / "c.json").write_text(json.dumps({**base, "benchmark": "c", "figures": {"summary": {"k": 1}}}))
    return results


def test_summary_renders_rows_in_file_order_with_provenance(tmp_path):
    table = summary.render(summary.load_rows(_results(tmp_path)))
    assert table.splitlines() == [
        "| benchmark | what | ours | anchor | ratio | target | run |",
        "|---|---|---|---|---|---|---|",
        "| a | memory | – | – | n/a | – | 2026-11-30 16:00 `abcdef0+` ([json](benchmarks/results/a.json)) |",
        "| b | step | 2 ms | plain, 1 ms | 2× (1.5–2.25) | ≤ 3× | 2026-11-30 16:00 `abcdef0` "
        "([json](benchmarks/results/b.json)) |",
        "| b wide | a\\|b | x | – | – | – | 2026-11-30 16:00 `abcdef0` ([json](benchmarks/results/b.json)) |",
    ]
    assert "No results" in summary.render([])


def test_summary_rewrites_between_markers_and_checks(tmp_path, capsys):
    results = _results(tmp_path)
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# B\n\nintro\n\n{summary.BEGIN}\nold table\n{summary.END}\n\n## rest\n")
    args = ["--results", str(results), "--file", str(doc)]
    assert summary.main([*args, "--check"]) == 1
    assert summary.main(args) == 0
    text = doc.read_text()
    assert text.startswith(f"# B\n\nintro\n\n{summary.BEGIN}\n| benchmark |") and text.endswith(
        f"json)) |\n{summary.END}\n\n## rest\n")
    assert "old table" not in text
    assert summary.main([*args, "--check"]) == 0
    assert summary.main(args) == 0 and doc.read_text() == text  # idempotent
    capsys.readouterr()
    assert summary.main([*args, "--print"]) == 0 and capsys.readouterr().out.startswith("| benchmark |")
    doc.write_text("# B\nno markers\n")
    with pytest.raises(SystemExit, match="summary:begin"):
        summary.main(args)
    (results / "broken.json").write_text("{")
    with pytest.raises(SystemExit, match="broken.json: not valid JSON"):
        summary.load_rows(results)
