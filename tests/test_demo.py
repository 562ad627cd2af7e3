"""A shortened `farcast demo`, end to end: files, and summary numbers that match the plot data."""

import json

import pytest

from farcast_core.errors import FarcastError
from flows.demo import run_demo


def test_short_demo_end_to_end(prefect_harness, tmp_path):
    out = tmp_path / "demo"
    lines = []
    data = run_demo(out, steps=80, every=10, ratio=2.0, echo=lines.append)
    for f in ("loss.png", "summary.json", "plot_data.json", "plain", "observed", "forecast", "resumed", "store"):
        assert (out / f).exists(), f
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    plot = json.loads((out / "plot_data.json").read_text())
    assert plot["summary"] == summary
    plain = {int(k): v for k, v in plot["plain"].items()}
    resumed = {int(k): v for k, v in plot["resumed"].items()}
    assert sorted(plain) == list(range(0, 81, 10)) and min(resumed) == 80 == summary["target_step"]
    assert summary["goal_loss"] == plain[80]
    assert summary["loss_at_observed"] == plain[40] and summary["loss_of_forecast"] == resumed[80]
    hit = next((s for s in sorted(resumed) if resumed[s] <= plain[80]), None)
    assert summary["farcast_steps"] == (None if hit is None else 40 + hit - 80)
    assert summary["plain_steps"] == next(s for s in sorted(plain) if plain[s] <= plain[80])
    assert any("steps saved" in line or "optimizer steps" in line or "did not reach" in line for line in lines)
    assert data["summary"] == summary

    # rerunning is safe: same directory, replaced contents
    again = run_demo(out, steps=80, every=10, ratio=2.0, echo=lambda m: None)
    assert again["summary"] == summary


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FarcastError, match="not made by 'farcast demo'"):
        run_demo(tmp_path, steps=80, every=10)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
