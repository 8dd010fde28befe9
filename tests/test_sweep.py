"""dftune sweep: one run per grid point, finished points skipped, one report."""

import json

from dftune.sweep import parse_grid, point_name, run_sweep


def test_grid_parsing():
    axes, points = parse_grid(["objective=nll,dft", "train.lr=1e-5,5e-5", "seed=0,1"])
    assert axes == ["train.objective", "train.lr", "train.seed"]
    assert len(points) == 8 and points[0] == {"train.objective": "nll", "train.lr": 1e-5, "train.seed": 0}
    assert point_name({"train.objective": "prob_power:alpha=2", "train.lr": 1e-4}) == "objective=prob_power-alpha=2_lr=0.0001"


def test_sweep_trains_evaluates_skips_and_reports(tiny_dir, problems_file, tmp_path, capsys):
    bench = tmp_path / "bench" / "toy"
    bench.mkdir(parents=True)
    (bench / "test.jsonl").write_text("".join(json.dumps({"id": str(i), "question": f"What is {i} plus 2?",
                                                          "answer": str(i + 2)}) + "\n" for i in range(2)))
    cfg = tmp_path / "base.yaml"
    cfg.write_text(f"model: {{name_or_path: {tiny_dir}}}\ndata: {{path: {problems_file}, max_length: 128}}\n"
                   "train: {global_batch: 8, micro_batch: 8, max_steps: 2, tensorboard: false}\n")
    ev = {"benchmarks": ["toy"], "n": 2, "max_new_tokens": 8, "data_dir": str(tmp_path / "bench")}
    grid = ["objective=nll,dft", "lr=1e-3,1e-2"]
    plan = run_sweep(str(cfg), grid, str(tmp_path / "sw"), evaluate_with=ev, print_only=True)
    printed = capsys.readouterr().out.splitlines()
    assert len(plan) == 4 and len(printed) == 8 and printed[0].startswith("dftune train")
    assert not (tmp_path / "sw").exists()  # print-only runs nothing
    run_sweep(str(cfg), grid, str(tmp_path / "sw"), evaluate_with=ev)
    for p in plan:
        assert (tmp_path / "sw" / p["name"] / "final" / "config.json").is_file()
        assert (tmp_path / "sw" / p["name"] / "eval" / "summary.json").is_file()
    page = (tmp_path / "sw" / "report.html").read_text()
    assert "<h2>Sweep</h2>" in page and 'alt="train.lr"' in page and "objective=dft" in page
    capsys.readouterr()
    run_sweep(str(cfg), grid, str(tmp_path / "sw"), evaluate_with=ev)
    assert capsys.readouterr().out.count("trained already") == 4
