"""The study archive's table: seeds of one configuration only, and the goal read seed by seed."""
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
import archive_run  # noqa: E402
import results_table  # noqa: E402


def metrics(experiment, seed, ba, rcc=0.1, offset=1.0, ci_half=0.02):
    rows = [("probe_ba", "10->40", ba, ci_half), ("retention_cc", "10->40", rcc, float("nan")),
            ("mag_offset", "10->40", offset, float("nan"))]
    return pd.DataFrame([{"experiment": experiment, "encoder": "e", "metric": m, "scope": s, "value": v,
                          "ci_low": v - h, "ci_high": v + h, "note": None, "seed": seed} for m, s, v, h in rows])


def test_goal_needs_the_gap_beyond_the_larger_seed_spread():
    tables = [metrics("mad", s, ba) for s, ba in zip((1, 2, 3), (0.40, 0.30, 0.35))]
    tables += [metrics("base", s, ba) for s, ba in zip((1, 2, 3), (0.24, 0.23, 0.22))]  # gap 0.12 > sd 0.05
    tables += [metrics("shuffled", s, ba) for s, ba in zip((1, 2, 3), (0.34, 0.27, 0.32))]  # gap 0.04 < sd 0.05
    ci_half = results_table.per_seed(tables, "probe_ba", "10->40", value="ci_half")
    rows = {r["control"]: r for r in results_table.goal_rows(results_table.per_seed(tables, "probe_ba", "10->40"), "mad",
                                                             ci_half=ci_half)}
    assert set(rows) == {"base", "shuffled"}  # controls that did not run are not invented
    assert rows["base"]["above"] and rows["base"]["gap"] == pytest.approx(0.12)
    assert not rows["shuffled"]["above"] and rows["shuffled"]["spread"] == pytest.approx(0.05)
    assert rows["shuffled"]["differences"] == "+0.060 / +0.030 / +0.030"
    assert rows["base"]["ci_half"] == pytest.approx(0.02)  # the evaluation's own resolution, beside the gap


def test_one_seed_is_never_above():
    ba = results_table.per_seed([metrics("mad", 0, 0.9), metrics("base", 0, 0.2)], "probe_ba", "10->40")
    (row,) = results_table.goal_rows(ba, "mad")
    assert not row["above"]


def test_archive_refuses_seeds_of_two_configurations(tmp_path):
    for seed, sha in ((1, "a" * 64), (2, "b" * 64)):
        (tmp_path / f"seed{seed}" / "mad").mkdir(parents=True)
        metrics("mad", seed, 0.3).to_csv(tmp_path / f"seed{seed}" / "mad" / "metrics.tsv", sep="\t", index=False)
        (tmp_path / f"seed{seed}" / "run.json").write_text(json.dumps(
            {"config_sha256": sha, "commit": ["c"], "cpu": "x"}))
    with pytest.raises(SystemExit, match="different configurations"):
        results_table.archive_summary(tmp_path, None)
    with pytest.raises(SystemExit, match=r"seed\(s\) \[3\] not archived"):
        results_table.archive_summary(tmp_path, [1, 3])


def test_training_end_reads_the_last_steps_beside_the_transfer(tmp_path):
    run = tmp_path / "seed1" / "mad"
    run.mkdir(parents=True)
    pd.DataFrame({"step": range(100), "teacher_entropy": [1.0] * 50 + [4.0] * 50,
                  "kl_teacher_student": [0.5] * 100, "mag_offset": [0.2] * 100}).to_csv(
        run / "train_log.tsv", sep="\t", index=False)
    ba = results_table.per_seed([metrics("mad", 1, 0.31)], "probe_ba", "10->40")
    (row,) = results_table.training_end(tmp_path, ba).to_dict("records")
    assert row["experiment"] == "mad" and row["BA(10->40)"] == pytest.approx(0.31)
    assert row["teacher entropy"] == pytest.approx(4.0)  # the last 50 steps only


def test_experiment_hash_covers_its_settings_and_init_chain_only():
    config = {"train": {"steps": 1000, "seeds": [0]}, "resources": {"default": {}},
              "experiments": {"base": {"steps": 600}, "mad": {"init": "base", "lr": 1e-4},
                              "interp": {"init": "base", "mode": "interp"}}}
    mad = archive_run.experiment_sha256(config, "mad")
    grown = {**config, "experiments": {**config["experiments"], "tri": {"init": "base", "mode": "tri"}},
             "resources": {"default": {"runtime": 60}}, "train": {**config["train"], "seeds": [0, 1]}}
    assert archive_run.experiment_sha256(grown, "mad") == mad  # another experiment, where/which runs
    assert archive_run.config_sha256(grown) != archive_run.config_sha256(config)
    for changed in ({**config, "experiments": {**config["experiments"], "base": {"steps": 300}}},  # its start
                    {**config, "train": {**config["train"], "steps": 500}}):  # a shared setting
        assert archive_run.experiment_sha256(changed, "mad") != mad


def _archive(folder, seed, whole, per_experiment):
    for name in per_experiment:
        (folder / f"seed{seed}" / name).mkdir(parents=True)
        metrics(name, seed, 0.3).to_csv(folder / f"seed{seed}" / name / "metrics.tsv", sep="\t", index=False)
    (folder / f"seed{seed}" / "run.json").write_text(json.dumps(
        {"config_sha256": whole, "commit": ["c"], "cpu": "x",
         "experiments": {n: {"config_sha256": whole, "experiment_sha256": h} for n, h in per_experiment.items()}}))


def test_archive_compares_seeds_per_experiment(tmp_path, capsys):
    # seed 2 ran after an experiment was added to config.yaml: another whole hash, mad's unchanged
    _archive(tmp_path / "ok", 1, "a" * 64, {"mad": "m" * 64, "base": "b" * 64})
    _archive(tmp_path / "ok", 2, "c" * 64, {"mad": "m" * 64, "base": "b" * 64, "tri": "t" * 64})
    results_table.archive_summary(tmp_path / "ok", None)
    assert f"configuration per experiment base {'b' * 12}, mad {'m' * 12}, tri {'t' * 12}" in capsys.readouterr().out
    _archive(tmp_path / "bad", 1, "a" * 64, {"mad": "m" * 64})
    _archive(tmp_path / "bad", 2, "a" * 64, {"mad": "n" * 64})
    with pytest.raises(SystemExit, match=r"experiment\(s\) \['mad'\] ran under different configurations"):
        results_table.archive_summary(tmp_path / "bad", None)
