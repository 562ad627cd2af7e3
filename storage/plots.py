"""The demo's picture: held-out loss against step, for the plain run and through the forecast."""

from __future__ import annotations

from pathlib import Path


def plot_demo(path: Path, data: dict) -> Path:
    """Write ``data`` (as in plot_data.json) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = {int(k): v for k, v in data["plain"].items()}
    resumed = {int(k): v for k, v in data["resumed"].items()}
    s = data["summary"]
    obs, target = s["observed_until"], s["target_step"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    xs = sorted(plain)
    ax.plot(xs, [plain[x] for x in xs], color="0.45", label="plain training")
    seen = [x for x in xs if x <= obs]
    ax.plot(seen, [plain[x] for x in seen], color="C0", lw=2.5, label=f"observed by farcast (steps 0-{obs})")
    rx = sorted(resumed)
    ax.plot(rx, [resumed[x] for x in rx], color="C3", lw=2, label=f"resumed from the forecast of step {target}")
    ax.annotate("", xy=(target, resumed[target]), xytext=(obs, plain[obs]),
                arrowprops=dict(arrowstyle="->", color="C3", ls="--"))
    ax.axhline(s["goal_loss"], color="0.6", ls=":", lw=1)
    ax.set_xlabel("global step")
    ax.set_ylabel("held-out loss")
    if s["farcast_steps"]:
        title = (f"loss {s['goal_loss']:.3f}: plain needs {s['plain_steps']} steps, "
                 f"farcast {s['farcast_steps']} ({s['speedup']:.2f}x fewer)")
    else:
        title = f"loss {s['goal_loss']:.3f}: plain needs {s['plain_steps']} steps; not reached through the forecast"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
