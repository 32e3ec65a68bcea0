"""``python -m benchmarks.bags`` at a tiny size: it runs and prints the promised JSON."""

from __future__ import annotations

import json

from benchmarks.bags import main


def test_bench_bags_prints_each_variants_rate_and_the_ratios(bag_cohort, capsys) -> None:
    root, _ = bag_cohort
    main(["--cohort", str(root / "h_a"), "--workers", "0,1", "--slides-per-step", "2",
          "--patches-per-slide", "4", "--steps", "2", "--warmup", "1", "--repeats", "2"])
    result = json.loads(capsys.readouterr().out)
    variants = {"bags_workers_0", "bags_workers_1", "memory"}
    assert result.keys() == {"setting", "patches_per_s", "patches_per_s_each_repeat",
                             "ratio_to_memory", "cpu_patches_per_s", "cpu_ratio_to_memory"}
    assert result["patches_per_s"].keys() == variants
    assert all(rate > 0 for rate in result["patches_per_s"].values())
    assert all(len(rates) == 2 for rates in result["patches_per_s_each_repeat"].values())
    assert result["ratio_to_memory"].keys() == variants - {"memory"}
    assert result["cpu_patches_per_s"].keys() == {"bags_workers_0", "memory"}
    assert result["cpu_ratio_to_memory"].keys() == {"bags_workers_0"}
    assert result["setting"]["slides"] == 6 and result["setting"]["patches"] == 72
    assert result["setting"]["patch_size"] == 32
