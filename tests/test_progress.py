"""Progress lines stay readable in logs: one per 10% mark, none for a short loop."""

from quantorder.progress import progress


def test_logs_get_one_line_per_ten_percent(capsys):
    assert list(progress(range(25), 25, "[stage] scoring", unit="batches", min_interval_s=0)) == list(range(25))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and "\r" not in "".join(lines)
    assert lines[0].startswith("[stage] scoring: 3/25 batches (12%), ")
    assert lines[-1].startswith("[stage] scoring: 25/25 batches (100%), ")


def test_a_short_loop_prints_nothing(capsys):
    assert sum(progress(range(1000), 1000, "[stage] quick")) == sum(range(1000))
    assert capsys.readouterr().out == ""
