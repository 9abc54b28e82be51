"""The bench's robustness statistics and power analysis (``fedsq_app.tools.bench.stats``), on synthetic numbers:
no training runs here."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest


def test_paired_t_power_matches_published_values_and_the_normal_approximation():
    from fedsq_app.tools.bench.stats import paired_t_power, seeds_for_power

    # Cohen's d = 1 with 10 pairs: power 0.803 (G*Power, paired t, two-sided α = 0.05); 9 pairs fall short.
    assert paired_t_power(1.0, 1.0, 10) == pytest.approx(0.8031, abs=2e-3)
    assert seeds_for_power(1.0, 1.0) == 10
    # d = 0.5: 34 pairs (G*Power: 0.808); the normal approximation (1.96 + 0.84)² / d² = 31.4 is a lower bound.
    assert seeds_for_power(5.0, 10.0) == 34
    assert paired_t_power(5.0, 10.0, 34) == pytest.approx(0.808, abs=3e-3)
    # Power rises with n, with the effect, and falls with the noise; no effect: power = α.
    assert paired_t_power(5, 8, 10) < paired_t_power(5, 8, 20) < paired_t_power(5, 4, 20)
    assert paired_t_power(0.0, 1.0, 12) == pytest.approx(0.05, abs=1e-9)
    assert math.isnan(paired_t_power(1.0, 1.0, 1))
    # A large effect against little noise: scipy's lower tail underflows to nan; the power is ~1, not nan.
    assert paired_t_power(5.0, 1.118, 5) == pytest.approx(1.0, abs=1e-5)
    assert paired_t_power(-5.0, 8.0, 24) == paired_t_power(5.0, 8.0, 24)


def test_sd_interval_brackets_the_sample_std():
    from fedsq_app.tools.bench.stats import sd_interval

    low, high = sd_interval(8.0, 5)
    # χ² quantiles on 4 df: 0.4844 and 11.1433 → 8·√(4/11.1433) = 4.79, 8·√(4/0.4844) = 22.99.
    assert (low, high) == pytest.approx((4.793, 22.989), abs=1e-2)


def test_lower_tail_counts_seeds_far_below_the_median():
    from fedsq_app.tools.bench.stats import lower_tail

    values = [90.0, 91.0, 92.0, 93.0, 94.0, 71.0, 83.5, 92.5, 92.0, 91.5]
    tail = lower_tail(values)
    assert tail["n"] == 10 and tail["median"] == pytest.approx(91.75) and tail["worst"] == 71.0
    assert tail["p10"] == pytest.approx(np.percentile(values, 10)) and tail["p10"] == pytest.approx(82.25)
    assert tail["below"] == 2  # 71.0 and 83.5 are more than 5 pp below 91.75; 90.0 is not
    assert lower_tail([90.0, 85.0, 95.0], tail_pp=5.0)["below"] == 0  # exactly 5 pp below: not beyond it
    assert lower_tail([])["n"] == 0


def test_rank_tests_and_brown_forsythe_decide_on_synthetic_seeds():
    from scipy import stats as scipy_stats

    from fedsq_app.tools.bench.stats import robustness_tests

    # The candidate wins on each of 8 seeds: sign test p = 2/2^8, Wilcoxon exact p = 2/2^8 too.
    base = [80.0, 85.0, 90.0, 70.0, 88.0, 86.0, 84.0, 83.0]
    cand = [b + d for b, d in zip(base, [1, 2, 3, 4, 5, 6, 7, 8])]
    t = robustness_tests(cand, base)
    assert (t["wins"], t["losses"], t["ties"]) == (8, 0, 0)
    assert t["sign_p"] == pytest.approx(2 / 2 ** 8) and t["wilcoxon_p"] == pytest.approx(2 / 2 ** 8)
    assert t["median_diff"] == pytest.approx(4.5)
    # Ties (0.5 pp steps that cancel in floating point) are dropped by both rank tests.
    t = robustness_tests([0.915, 0.92, 0.93], [0.91, 0.915, 0.93])
    assert t["ties"] == 1 and t["wins"] == 2 and t["sign_p"] == pytest.approx(0.5)
    # Brown–Forsythe is scipy's median-centred Levene: a tight candidate (std 1 pp) vs a spread baseline (6 pp).
    rng = np.random.default_rng(0)
    tight = list(91 + rng.normal(0, 1, 20))
    heavy = list(91 + rng.normal(0, 6, 20))
    t = robustness_tests(tight, heavy)
    assert t["bf_p"] == pytest.approx(scipy_stats.levene(tight, heavy, center="median").pvalue)
    assert t["bf_p"] < 0.05
    assert robustness_tests(tight, [v + 0.5 for v in tight])["bf_p"] == pytest.approx(1.0)
    assert math.isnan(robustness_tests([90.0, 92.0], [70.0, 91.0])["bf_p"])  # 2 seeds: no spread test


def test_report_writes_the_robustness_tables_and_the_power_analysis(tmp_path):
    from fedsq_app.tools.bench.grid import run_grid
    from fedsq_app.tools.bench.presets import Preset, Setup
    from fedsq_app.tools.bench.report import write_report

    preset = Preset(setups=(Setup("smallcnn"),), strategies=("fedsq", "fedavg", "fedadam"), partitions=("0.1",),
                    epochs=(1,), seeds=tuple(range(6)), num_clients=3, base={"num-server-rounds": 4})
    # FedAvg and FedAdam collapse on seeds 1 and 4; FedSQ stays within 1 pp.
    best = {"fedsq": [0.91, 0.90, 0.92, 0.91, 0.90, 0.92],
            "fedavg": [0.91, 0.70, 0.92, 0.90, 0.80, 0.91],
            "fedadam": [0.92, 0.75, 0.92, 0.91, 0.78, 0.90]}

    def simulate(run_config, num_supernodes, **kwargs):
        top = best[run_config["strategy"]][run_config["seed"]]
        curve = [top - 0.1, top - 0.05, top, top - 0.01]
        folder = Path(run_config["out-dir"]) / run_config["run-name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps({
            "config": {"dataset": "embedded", "patience": 2}, "initial": {"val_accuracy": 0.1},
            "test_accuracy": top, "stopped_early": {"after_round": 4},
            "rounds": [{"round": i + 1, "val_accuracy": a, "wall_time_s": 1.0} for i, a in enumerate(curve)]}))

    run_grid(preset, tmp_path, simulate_fn=simulate)
    written = write_report(preset, tmp_path)
    assert {"robustness.csv", "robustness_tests.csv", "power.csv", "robustness_bva.png"} <= set(written["files"])
    tails = {r["strategy"]: r for r in csv.DictReader(open(tmp_path / "robustness.csv"))}
    assert float(tails["fedavg"]["worst"]) == pytest.approx(70.0) and tails["fedavg"]["below"] == "2"
    assert tails["fedsq"]["below"] == "0"
    tests = {(r["candidate"], r["baseline"]): r for r in csv.DictReader(open(tmp_path / "robustness_tests.csv"))}
    assert (tests[("fedsq", "fedavg")]["wins"], tests[("fedsq", "fedavg")]["ties"]) == ("4", "2") and tests[("fedsq", "fedadam")]["n"] == "6"
    power = {(r["candidate"], r["baseline"]): r for r in csv.DictReader(open(tmp_path / "power.csv"))}
    assert int(power[("fedsq", "fedavg")]["seeds_needed"]) > 6
    assert tests[("fedadam", "fedavg")]["n"] == "6"  # a baseline against FedAvg too
    assert "| fedadam |" not in (tmp_path / "summary.md").read_text().split("Claims, each decided")[1].split("\n\n")[1]
    markdown = (tmp_path / "summary.md").read_text()
    assert "Brown–Forsythe" in markdown and "Power analysis" in markdown and "BVA vs FedAdam (pp)" in markdown


def test_strategy_overrides_reach_only_their_strategy():
    from fedsq_app.config import RunConfig
    from fedsq_app.tools.bench.grid import Cell
    from fedsq_app.tools.bench.presets import PRESETS, parse_preset

    preset = parse_preset('strategies = ["fedavg", "fedadam", "fedsq-adam"]\n[base]\nserver-lr = 0.003\n'
                          '[strategy-overrides]\nfedadam = { server-lr = 0.01 }\n[[setups]]\nmodel = "smallcnn"\n')
    configs = {s: RunConfig.from_mapping(Cell(preset.setups[0], s, "0.1", 1, 0).run_config(preset, Path("cells")))
               for s in preset.strategies}
    assert configs["fedadam"].server_lr == 0.01
    assert configs["fedsq-adam"].server_lr == configs["fedavg"].server_lr == 0.003
    robust = PRESETS["fmnist-cross-robust"]
    assert robust.strategy_overrides["fedadam"]["server-lr"] == 0.01 and len(robust.seeds) >= 24
    six_k = PRESETS["fmnist-6k"]
    assert {"fedprox", "fedadam", "fedsq-m"} <= set(six_k.strategies) and six_k.num_clients == 30
    assert six_k.tune_on == (("0.1", 1),)  # μ tuned once, at the skew the claims are about
