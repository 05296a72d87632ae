"""bench/report.py keeps what ``make bench`` does not measure when it rewrites the page."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.report import standalone_sections  # noqa: E402


def test_standalone_and_demo_sections_are_kept_and_suite_sections_are_not():
    page = ("# Benchmarks\n\nintro\n\n## Save stall and ingest\n\n| a |\n\n"
            "## Time to resume (`make demo`)\n\nphases\n\n"
            "## Replica splitting (`python -m bench.replicas`)\n\n| d |\n\n"
            "## Local restore\n\n| r |\n")
    kept = standalone_sections(page)
    assert "## Time to resume (`make demo`)\n\nphases" in kept
    assert "## Replica splitting (`python -m bench.replicas`)\n\n| d |" in kept
    assert "Save stall" not in kept and "Local restore" not in kept and "intro" not in kept


def test_a_case_run_alone_without_merged_results_keeps_the_other_suite_sections():
    from bench.report import keep_unmeasured

    previous = ("# Benchmarks\n\nintro\n\nMachine: old.\n\n## Save stall and ingest\n\n| a |\n\n"
                "## Training overhead\n\n| t |\n\n## DLRover Flash Checkpoint\n\n| d |\n\n"
                "## Replica splitting (`python -m bench.replicas`)\n\n| r |\n")
    rendered = ("Machine: new.\n\n## Training overhead, frameworks\n\n| f |\n\n"
                "## DLRover Flash Checkpoint\n\n| d2 |\n")
    page = keep_unmeasured(rendered, previous)
    assert page == ("Machine: new.\n\n## Save stall and ingest\n\n| a |\n\n"
                    "## Training overhead\n\n| t |\n\n## Training overhead, frameworks\n\n| f |\n\n"
                    "## DLRover Flash Checkpoint\n\n| d2 |\n")
