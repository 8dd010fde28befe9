"""dftune sweep: one run per grid point, finished points reused only with the same settings, one report."""

import json

import pytest

from dftune.eval.generate import SamplingConfig
from dftune.eval.run import EvalConfig
from dftune.settings import ConfigError
from dftune.sweep import SweepConfig, parse_grid, point_name, run_sweep, split_values


def test_grid_parsing():
    axes, points = parse_grid(["objective=nll,dft", "train.lr=1e-5,5e-5", "seed=0,1"])
    assert axes == ["train.objective", "train.lr", "train.seed"]
    assert len(points) == 8 and points[0] == {"train.objective": "nll", "train.lr": 1e-5, "train.seed": 0}
    assert point_name({"train.objective": "prob_power:alpha=2", "train.lr": 1e-4}) == "objective=prob_power-alpha=2_lr=0.0001"


@pytest.mark.parametrize("raw, values", [
    ("nll,dft", ["nll", "dft"]),
    ("nll,thresholded:q=0.2,normalize=kept,dft", ["nll", "thresholded:q=0.2,normalize=kept", "dft"]),
    ("dft:floor=0.1,protect=special,nll", ["dft:floor=0.1,protect=special", "nll"]),
    ("a,b;c", ["a,b", "c"]),  # ";" separates explicitly
    ("1e-5, 5e-5,", ["1e-5", "5e-5"]),
])
def test_values_may_hold_commas_of_objective_specs(raw, values):
    assert split_values(raw) == values


def test_sweep_trains_evaluates_reuses_and_reports(tiny_dir, problems_file, tmp_path, capsys):
    bench = tmp_path / "bench" / "toy"
    bench.mkdir(parents=True)
    (bench / "test.jsonl").write_text("".join(json.dumps({"id": str(i), "question": f"What is {i} plus 2?",
                                                          "answer": str(i + 2)}) + "\n" for i in range(2)))
    cfg_file = tmp_path / "base.yaml"
    cfg_file.write_text(f"model: {{name_or_path: {tiny_dir}}}\ndata: {{path: {problems_file}, max_length: 128}}\n"
                        "train: {global_batch: 8, micro_batch: 8, max_steps: 2}\n")
    ev = EvalConfig(benchmarks=["toy"], backend="hf", prompt="chat", data_dir=str(tmp_path / "bench"), grade_workers=2,
                    sampling=SamplingConfig(n=2, max_new_tokens=8, seed=3))
    sw = SweepConfig(config=str(cfg_file), grid=["objective=nll,dft", "lr=1e-3,1e-2"], out=str(tmp_path / "sw"),
                     eval=ev, print_only=True)
    plan = run_sweep(sw)
    printed = capsys.readouterr().out.splitlines()
    assert len(plan) == 4 and len(printed) == 8 and printed[0].startswith("dftune train")
    assert "seed=3" in printed[1] and "prompt=chat" in printed[1]  # each point's eval keeps prompt and seed
    assert not (tmp_path / "sw").exists()  # print-only runs nothing
    sw.print_only = False
    run_sweep(sw)
    for p in plan:
        point = tmp_path / "sw" / p["name"]
        assert (point / "final" / "config.json").is_file()
        stored = json.loads((point / "eval" / "eval_config.json").read_text())
        assert stored["prompt"] == "chat" and stored["sampling"]["seed"] == 3
    page = (tmp_path / "sw" / "report.html").read_text()
    assert "<h2>Sweep</h2>" in page and "objective=dft" in page
    capsys.readouterr()
    run_sweep(sw)
    assert capsys.readouterr().out.count("trained already") == 4
    # the same folder with another fixed setting: the finished points are not silently reused
    sw.set = ["train.warmup_ratio=0.5"]
    with pytest.raises(ConfigError, match="trained with other settings"):
        run_sweep(sw)
