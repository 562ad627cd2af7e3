"""A shortened `farcast demo`, end to end: files, and summary numbers that match the plot data."""

import json

import pytest

from farcast_core.errors import FarcastError
from farcast.examples import summarise
from farcast.flows.demo import run_demo


@pytest.mark.slow  # ~1 min: three Trainer runs and a flow (make demo runs the full-length one)
def test_short_demo_end_to_end(prefect_harness, tmp_path):
    out = tmp_path / "demo"
    lines = []
    data = run_demo(out, steps=80, every=10, ratio=2.0, echo=lines.append)
    for f in ("loss.png", "summary.json", "plot_data.json", "plain", "observed", "forecast", "resumed", "store"):
        assert (out / f).exists(), f
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    plot = json.loads((out / "plot_data.json").read_text())
    assert plot["summary"] == summary == data["summary"]
    plain = {int(k): v for k, v in plot["plain"].items()}
    resumed = {int(k): v for k, v in plot["resumed"].items()}
    # farcast saw steps 0-40 and forecast step 80; training resumed from the forecast for 40 more steps
    assert sorted(plain) == list(range(0, 81, 10)) and summary["observed_until"] == 40
    assert sorted(resumed) == list(range(80, 121, 10)) and summary["target_step"] == 80
    assert (out / "forecast" / "checkpoint-80" / "trainer_state.json").is_file()
    # the forecast moved the weights on: its held-out loss is below that of the newest step farcast saw
    # (measured: 1.84 vs 1.97 in this 80-step run)
    assert summary["loss_of_forecast"] < summary["loss_at_observed"]
    assert any("steps saved" in line or "optimizer steps" in line or "did not reach" in line for line in lines)

    # rerunning is safe: same directory, replaced contents
    again = run_demo(out, steps=80, every=10, ratio=2.0, echo=lambda m: None)
    assert again["summary"] == summary


def test_steps_saved_are_counted_from_where_farcast_stopped_observing():
    """Hand-worked curves: the plain run reaches its final loss 0.4 at step 40; farcast saw steps 0-20,
    jumped to 40 for free and reached 0.4 ten resumed steps later: 30 real steps, 10 saved."""
    plain = {0: 1.0, 10: 0.8, 20: 0.6, 30: 0.5, 40: 0.4}
    s = summarise(plain, {40: 0.42, 50: 0.38, 60: 0.35}, observed_until=20, target_step=40)
    assert (s["goal_loss"], s["plain_steps"], s["farcast_steps"], s["steps_saved"]) == (0.4, 40, 30, 10)
    assert s["speedup"] == pytest.approx(4 / 3)
    never = summarise(plain, {40: 0.5, 50: 0.45}, observed_until=20, target_step=40)
    assert never["farcast_steps"] is None and never["steps_saved"] is None and never["speedup"] is None


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
