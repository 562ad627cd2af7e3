"""A shortened `farcast demo`, end to end: files, and summary numbers that match the plot data."""

import json

import pytest

from farcast_core.errors import FarcastError
from farcast.flows.demo import run_demo


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


def test_plot_x_axis_is_optimizer_steps_spent(tmp_path, monkeypatch):
    """The resumed curve starts where farcast stopped observing (the jump is free) and ends where the plain
    run ends; the steps saved are the distance between the two at the goal loss."""
    import matplotlib.figure

    from farcast.storage.plots import plot_demo

    plain = {s: 1.0 - s / 500 for s in range(0, 401, 20)}
    resumed = {s: 0.2 - (s - 400) / 1000 for s in range(400, 601, 20)}
    summary = {"observed_until": 200, "target_step": 400, "goal_loss": plain[400], "plain_steps": 400,
               "farcast_steps": 200, "steps_saved": 200, "speedup": 2.0}
    drawn = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: drawn.update(lines={ln.get_label(): ln.get_xdata() for ln in fig.axes[0].lines},
                                                             xlabel=fig.axes[0].get_xlabel(), xlim=fig.axes[0].get_xlim()))
    plot_demo(tmp_path / "p.png", {"plain": plain, "resumed": resumed, "summary": summary})
    jump = next(x for label, x in drawn["lines"].items() if label.startswith("jump"))
    assert drawn["xlabel"] == "optimizer steps spent"
    assert jump[0] == 200 and jump[1] == 200 and jump[-1] == 400 == max(drawn["lines"]["plain training"])
    assert drawn["xlim"] == (0, 400)
