"""snapshotd.tools.torchrun's reference run: a failed baseline run is run again, once."""

from pathlib import Path

import pytest

from snapshotd.tools import torchrun


def fake_runs(monkeypatch, rcs):
    """Replace one torchrun run by a function that leaves a log and a partial loss file."""
    calls = []

    def once(script, args, out, nproc, deadline, progress):
        out.mkdir(parents=True, exist_ok=True)
        assert not (out / "loss.jsonl").exists()       # a rerun starts from a clean directory
        (out / "torchrun.log").write_text(f"run {len(calls)}\n")
        (out / "loss.jsonl").write_text('{"step": 0}\n')
        calls.append(out)
        return rcs[len(calls) - 1]

    monkeypatch.setattr(torchrun, "_reference_once", once)
    return calls


def test_a_failed_reference_run_is_run_again_and_its_log_kept(monkeypatch, tmp_path, capsys):
    calls = fake_runs(monkeypatch, [-6, 0])
    assert torchrun.reference_run("train.py", [], tmp_path, 2) == 0
    assert len(calls) == 2
    assert (tmp_path / "torchrun.1.log").read_text() == "run 0\n"
    assert (tmp_path / "torchrun.log").read_text() == "run 1\n"
    assert "torchrun.1.log" in capsys.readouterr().err


@pytest.mark.parametrize("rcs,expected,runs", [([1, 1], 1, 2), ([124], 124, 1), ([0], 0, 1)])
def test_reference_run_gives_up_after_its_attempts_and_never_reruns_a_timeout(
        monkeypatch, tmp_path: Path, rcs, expected, runs):
    calls = fake_runs(monkeypatch, rcs)
    assert torchrun.reference_run("train.py", [], tmp_path, 2) == expected
    assert len(calls) == runs
