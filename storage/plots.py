"""The demo's picture: held-out loss against the optimizer steps actually spent, for the plain run
and for the run resumed from the forecast (the jump itself costs no step), so the steps saved show
as the horizontal distance between the two curves at the plain run's final loss."""

from __future__ import annotations

from pathlib import Path


def spent(step: int, observed_until: int, target_step: int) -> int:
    """Optimizer steps spent to reach global step ``step`` of the resumed run: the observed ones, then
    the ones trained after the jump from ``observed_until`` to ``target_step``."""
    return observed_until + (step - target_step)


def plot_demo(path: Path, data: dict) -> Path:
    """Write ``data`` (as in plot_data.json) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = {int(k): v for k, v in data["plain"].items()}
    resumed = {int(k): v for k, v in data["resumed"].items()}
    s = data["summary"]
    obs, target, goal = s["observed_until"], s["target_step"], s["goal_loss"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    xs = sorted(plain)
    end = max(max(xs), max(spent(g, obs, target) for g in resumed))
    ax.plot(xs, [plain[x] for x in xs], color="0.45", label="plain training")
    seen = [x for x in xs if x <= obs]
    ax.plot(seen, [plain[x] for x in seen], color="C0", lw=2.5, label=f"observed by farcast (steps 0-{obs})")
    rx = sorted(resumed)
    ax.plot([obs] + [spent(g, obs, target) for g in rx], [plain[obs]] + [resumed[g] for g in rx], color="C3", lw=2,
            label=f"jump to the forecast of step {target}, then training resumed from it")
    ax.axhline(goal, color="0.6", ls=":", lw=1)
    if s["farcast_steps"]:
        ax.annotate("", xy=(s["farcast_steps"], goal), xytext=(s["plain_steps"], goal),
                    arrowprops=dict(arrowstyle="<->", color="k", lw=1.2))
        ax.text((s["farcast_steps"] + s["plain_steps"]) / 2, goal, f"{s['steps_saved']} steps saved",
                ha="center", va="bottom", fontsize=9)
        title = (f"loss {goal:.3f}: plain needs {s['plain_steps']} steps, "
                 f"farcast {s['farcast_steps']} ({s['speedup']:.2f}x fewer)")
    else:
        title = f"loss {goal:.3f}: plain needs {s['plain_steps']} steps; not reached through the forecast"
    ax.set_xlim(0, end)
    ax.set_xlabel("optimizer steps spent")
    ax.set_ylabel("held-out loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
