"""federation.run_files: the named key sets, config flattening and the CSV reader."""

from __future__ import annotations

import pytest

from federation import run_files


def test_key_sets_name_how_a_run_executes_and_what_runs_compare():
    execution = ["backend", "checkpoint_every", "comm_timeout_s", "device", "output_dir",
                 "slides.workers", "threads"]
    assert sorted(run_files.EXECUTION_KEYS) == execution
    assert sorted(run_files.RESUMABLE_CHANGES) == sorted(
        {*execution, "rounds"} - {"output_dir", "threads"})  # threads changes the numbers
    assert sorted(run_files.RUNNER_KEYS) == ["algorithm", "backend", "output_dir", "seed"]
    assert sorted(run_files.RUN_ONLY_KEYS) == sorted(
        {*execution, "algorithm", "seed", "data.root", "eval_every", "report.shared_metrics",
         "report.share_timings"})
    # what hospitals on machines of their own set for themselves
    assert sorted(run_files.PER_PROCESS_KEYS) == [
        "backend", "data.root", "device", "output_dir", "slides.workers"]


def test_config_hash_leaves_out_the_keys_it_is_told_to():
    flat = {"rounds": 3, "output_dir": "/a", "dp.delta": None}
    assert run_files.config_hash(flat) != run_files.config_hash({**flat, "output_dir": "/b"})
    assert (run_files.config_hash(flat, ignore={"output_dir"})
            == run_files.config_hash({**flat, "output_dir": "/b"}, ignore={"output_dir"}))
    assert run_files.config_hash(flat) != run_files.config_hash({**flat, "rounds": 4})


def test_checkpoint_rounds_are_the_whole_files_of_a_hospital(tmp_path):
    checkpoints = tmp_path / run_files.HOSPITALS / "h_a" / run_files.CHECKPOINTS
    assert not run_files.has_checkpoint(tmp_path)
    checkpoints.mkdir(parents=True)
    for name in (run_files.checkpoint_file(10), run_files.checkpoint_file(2),
                 ".round_000012.pt.partial-99", run_files.CHECKPOINT_CONFIG):
        (checkpoints / name).write_text("")
    assert run_files.checkpoint_rounds(checkpoints) == [2, 10]
    assert run_files.has_checkpoint(tmp_path)


def test_flatten_config_gives_dotted_keys():
    nested = {"rounds": 3, "dp": {"delta": None, "mechanism": "ghost"}, "data": {"name": "m"}}
    assert run_files.flatten_config(nested) == {
        "rounds": 3, "dp.delta": None, "dp.mechanism": "ghost", "data.name": "m"}


def test_read_rows_numbers_lines_and_checks_the_header(tmp_path):
    path = tmp_path / run_files.PRIVACY
    path.write_text("round,client,epsilon,delta,unit,status\n1,0,0.5,1e-05,slide,active\n")
    assert run_files.read_rows(path, run_files.PRIVACY_COLUMNS[:6]) == [
        (2, {"round": "1", "client": "0", "epsilon": "0.5", "delta": "1e-05", "unit": "slide",
             "status": "active"})]
    with pytest.raises(ValueError, match=r"privacy.csv: header lacks column\(s\) value$"):
        run_files.read_rows(path, ("round", "value"))
