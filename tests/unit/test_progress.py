"""softcache.runtime.progress: the lines a long job prints to a log."""

from __future__ import annotations

import io

from softcache.runtime.progress import Progress


def test_log_lines_count_units_and_end_at_the_total() -> None:
    out = io.StringIO()  # not a terminal: one line per report
    bar = Progress(100, "build tokens", stream=out, log_every=0.0, initial=40, unit="tokens")
    bar.update(30)
    bar.update(30)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("build tokens [") and "70/100" in lines[0]
    assert "100/100 (100.0%)" in lines[-1] and "tokens/s" in lines[-1]
    assert all("samples/s" not in line for line in lines)


def test_disabled_prints_nothing() -> None:
    out = io.StringIO()
    bar = Progress(10, "scan", stream=out, enabled=False)
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""
