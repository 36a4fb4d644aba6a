"""Loss curves of a demo training run, one panel per stage, as a PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from .common import LossLog

TITLES = {
    "a_vision": "(a) ViT pre-training (CLIP-style)",
    "a_understanding": "(a) understanding: ViT + LLM",
    "b_vae": "(b) VAE",
    "b_encoder": "(b) CLIP-feature encoder",
    "b_unet": "(b) UNet decoder",
    "c_generation": "(c) generation: queries + DiT (LLM frozen)",
}


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(log: LossLog, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    stages = [s for s in TITLES if s in log.history] + [s for s in log.history if s not in TITLES]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for name, points in log.history[stage].items():
            steps = [s for s, _ in points]
            values = [v for _, v in points]
            window = max(1, len(values) // 50)
            ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values, window), label=name, color=ax.lines[-1].get_color())
        ax.set_yscale("log")
        ax.set_title(TITLES.get(stage, stage), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
