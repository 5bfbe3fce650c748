"""symfast train --sweep: pareto.json from the runs' own metrics, reuse of finished runs, and its flags."""

import json

import numpy as np
import pytest

import symfast.train.sweep as sweep_mod
import symfast.train.task as task
from symfast.cli import _seed_list, main
from symfast.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ARMS = ["dcs", "one_shot_magnitude", "gradual_magnitude_wu"]
TINY = ["train", "--sweep", "--task", "digits", "--steps", "8", "--width", "4", "--eval-every", "4", "--no-progress",
        "--alpha", "3e-3", "--baselines", "one_shot_magnitude,gradual_magnitude_wu", "--targets", "0.5,0.8",
        "--seeds", "2"]


def _arm(m, arm):
    return m if arm == "dcs" else m["baselines"][arm]


def test_sweep_writes_pareto_from_the_runs_metrics_and_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    assert main([*TINY, "--out", str(out)]) == 0
    p = json.loads((out / "pareto.json").read_text())
    assert (p["task"], p["structure"], p["targets"], p["seeds"]) == ("digits", "elementwise", [0.5, 0.8], [0, 1])
    assert p["arms_order"] == ARMS and set(p["arms"]) == set(ARMS) and set(p["paired"]) == set(ARMS[1:])
    assert "seed" not in p["config"] and "target_sparsity" not in p["config"] and p["config"]["steps"] == 8
    for t in ("0.5", "0.8"):
        runs = {s: json.loads((out / p["runs"][t][s] / "metrics.json").read_text()) for s in ("0", "1")}
        for s, m in runs.items():  # each run is the one asked for
            assert (m["target_sparsity"], m["config"]["seed"]) == (float(t), int(s))
        for arm in ARMS:
            entry = p["arms"][arm][t]
            assert set(entry) == {"sparsity", "val_loss", "val_accuracy"}, arm  # digits: no byte accuracy
            for k, stat in entry.items():
                vals = [_arm(runs[s], arm)[k] for s in ("0", "1")]
                assert stat["per_seed"] == {"0": vals[0], "1": vals[1]}, (arm, k)
                assert stat["mean"] == pytest.approx(np.mean(vals), abs=1e-15)
                assert stat["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-15)
                assert (stat["min"], stat["max"], stat["n"]) == (min(vals), max(vals), 2)
        for arm in ARMS[1:]:
            # The baseline ran in DCS's own run, at DCS's sparsity of that seed and target.
            for s in ("0", "1"):
                assert _arm(runs[s], arm)["sparsity"] == pytest.approx(runs[s]["sparsity"], abs=0.01)
            for k in ("val_loss", "val_accuracy"):
                diff = [runs[s][k] - runs[s]["baselines"][arm][k] for s in ("0", "1")]
                d = p["paired"][arm][t][k]
                assert list(d["per_seed"].values()) == pytest.approx(diff, abs=1e-15), (arm, k)
                assert d["mean"] == pytest.approx(np.mean(diff), abs=1e-15)
                assert d["std"] == pytest.approx(np.std(diff, ddof=1), abs=1e-15)
                better = sum(x < 0 for x in diff) if k == "val_loss" else sum(x > 0 for x in diff)
                assert d["dcs_better"] == better
    assert (out / "pareto.png").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "target 0.8:" in text and "DCS - it" in text and "pareto.json" in text
    far = [t for t in ("0.5", "0.8") if abs(p["arms"]["dcs"][t]["sparsity"]["mean"] - float(t)) > 0.05]
    assert ("note: DCS ended more than 0.05 from the target at " in text) == bool(far)

    # Again: every run is finished with these settings, so nothing is trained and the summary is the same.
    calls = []
    real_run = sweep_mod.run
    monkeypatch.setattr(sweep_mod, "run", lambda cfg, d, **k: calls.append((d, k["resume"])) or real_run(cfg, d, **k))
    assert main([*TINY, "--out", str(out)]) == 0
    assert calls == [] and json.loads((out / "pareto.json").read_text()) == p
    # A run that did not finish (here: its metrics.json is gone, its checkpoints kept) is resumed, alone.
    (out / p["runs"]["0.8"]["1"] / "metrics.json").unlink()
    assert main([*TINY, "--out", str(out)]) == 0
    assert calls == [(out / p["runs"]["0.8"]["1"], True)]
    again = json.loads((out / "pareto.json").read_text())
    assert again["arms"] == p["arms"] and again["paired"] == p["paired"]
    # Other settings are not reused: a changed --steps trains every run again.
    calls.clear()
    monkeypatch.setattr(sweep_mod, "run", lambda cfg, d, **k: calls.append((d, k["resume"])) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main([*TINY[:5], "10", *TINY[6:], "--out", str(out)])
    assert calls == [(out / p["runs"]["0.5"]["0"], False)]


def test_summary_of_one_seed_has_no_spread():
    m = {"task": "digits", "structure": "elementwise", "config": {"seed": 0, "target_sparsity": 0.5},
         "sparsity": 0.5, "val_loss": 1.0, "val_accuracy": 0.5, "val_byte_accuracy": None,
         "baselines": {"one_shot_magnitude": {"sparsity": 0.5, "val_loss": 1.25, "val_accuracy": 0.25,
                                              "val_byte_accuracy": None}}}
    p = sweep_mod.summarize({0.5: {3: m}})
    assert p["arms"]["dcs"]["0.5"]["val_loss"] == {"per_seed": {"3": 1.0}, "mean": 1.0, "std": None, "min": 1.0,
                                                   "max": 1.0, "n": 1}
    d = p["paired"]["one_shot_magnitude"]["0.5"]
    assert d["val_loss"]["per_seed"] == {"3": -0.25} and d["val_loss"]["dcs_better"] == 1
    assert d["val_accuracy"]["per_seed"] == {"3": 0.25} and d["val_accuracy"]["dcs_better"] == 1


@pytest.mark.parametrize("text, seeds", [("3", [0, 1, 2]), ("4,7", [4, 7]), ("7,", [7]), ("1", [0])])
def test_seeds_flag_is_a_count_or_a_list(text, seeds):
    assert _seed_list(text) == seeds


@pytest.mark.parametrize("flags, expected", [
    (["--sweep", "--targets", "0.5,1"], "argument --targets: expected distinct comma-separated numbers S with "
                                        "0 < S < 1, got '0.5,1'"),
    (["--sweep", "--targets", "0,0.5"], "argument --targets: expected distinct comma-separated numbers S with "
                                        "0 < S < 1, got '0,0.5'"),
    (["--sweep", "--targets", "nan"], "argument --targets: expected distinct comma-separated numbers S with "
                                      "0 < S < 1, got 'nan'"),
    (["--sweep", "--targets", "0.5,0.5"], "argument --targets: expected distinct"),
    (["--sweep", "--targets", ""], "argument --targets: expected distinct comma-separated numbers S with "
                                   "0 < S < 1, got ''"),
    (["--sweep", "--seeds", ""], "argument --seeds: expected N >= 1 (the seeds 0..N-1) or distinct "
                                 "comma-separated seeds 0 <= s < 2**44 (one seed: 's,'), got ''"),
    (["--sweep", "--seeds", ","], "argument --seeds: expected N >= 1"),
    (["--sweep", "--seeds", "0"], "argument --seeds: expected N >= 1"),
    (["--sweep", "--seeds", "1,1"], "argument --seeds: expected N >= 1"),
    (["--sweep", "--seeds", "1,-2"], "argument --seeds: expected N >= 1"),
    (["--targets", "0.5"], "argument --targets: applies only with --sweep"),
    (["--seeds", "2"], "argument --seeds: applies only with --sweep"),
    (["--sweep", "--seed", "1"], "argument --seed: not with --sweep"),
    (["--sweep", "--target-sparsity", "0.5"], "argument --target-sparsity: not with --sweep"),
    (["--sweep", "--resume"], "argument --resume: not with --sweep"),
    (["--sweep", "--structure", "lowrank"], "argument --structure: --sweep needs one of elementwise, group"),
    (["--sweep", "--alpha", "0"], "argument --alpha: --sweep steers a starting alpha, which must be > 0, got 0"),
])
def test_cli_sweep_rejects_bad_flags(tmp_path, capsys, monkeypatch, flags, expected):
    calls = []
    monkeypatch.setattr(sweep_mod, "sweep", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(task, "run", lambda *a, **k: calls.append(a))
    with pytest.raises(SystemExit) as exc:
        main(["train", "--no-progress", "--out", str(tmp_path), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err and calls == []


def test_library_sweep_checks_its_arguments(tmp_path):
    base = TrainConfig(task="digits", steps=4, width=2)
    for kw, msg in ((dict(targets=[0.5, 1.0]), "targets must be distinct numbers in (0, 1), got [0.5, 1.0]"),
                    (dict(targets=[]), "targets must be distinct numbers in (0, 1), got []"),
                    (dict(seeds=[]), "seeds must be distinct integers >= 0, at least one, got []"),
                    (dict(seeds=[1, 1]), "seeds must be distinct integers >= 0, at least one, got [1, 1]")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            sweep_mod.sweep(base, tmp_path, progress=False, **kw)
    with pytest.raises(ValueError, match="structure must be one of"):
        sweep_mod.sweep(TrainConfig(task="digits", structure="lowrank"), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
