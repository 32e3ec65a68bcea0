"""federation.run_files: the named key sets, config flattening and the CSV reader."""

from __future__ import annotations

import pytest

from federation import run_files


def test_key_sets_name_how_a_run_executes_and_what_runs_compare():
    execution = ["backend", "checkpoint_every", "device", "output_dir", "slides.workers",
                 "threads"]
    assert sorted(run_files.EXECUTION_KEYS) == execution
    assert sorted(run_files.RESUMABLE_CHANGES) == sorted(
        {*execution, "rounds"} - {"output_dir", "threads"})  # threads changes the numbers
    assert sorted(run_files.RUNNER_KEYS) == ["algorithm", "backend", "output_dir", "seed"]
    assert sorted(run_files.RUN_ONLY_KEYS) == sorted(
        {*execution, "algorithm", "seed", "data.root", "eval_every"})


def test_flatten_config_gives_dotted_keys():
    nested = {"rounds": 3, "dp": {"delta": None, "mechanism": "ghost"}, "data": {"name": "m"}}
    assert run_files.flatten_config(nested) == {
        "rounds": 3, "dp.delta": None, "dp.mechanism": "ghost", "data.name": "m"}


def test_read_rows_numbers_lines_and_checks_the_header(tmp_path):
    path = tmp_path / run_files.PRIVACY
    path.write_text("round,client,epsilon,delta,unit,status\n1,0,0.5,1e-05,slide,active\n")
    assert run_files.read_rows(path, run_files.PRIVACY_COLUMNS) == [
        (2, {"round": "1", "client": "0", "epsilon": "0.5", "delta": "1e-05", "unit": "slide",
             "status": "active"})]
    with pytest.raises(ValueError, match=r"privacy.csv: header lacks column\(s\) value$"):
        run_files.read_rows(path, ("round", "value"))
