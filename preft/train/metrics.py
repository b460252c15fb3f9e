"""Training metrics: one JSON object per logged step in ``metrics.jsonl``, and PNG curves."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends ``{"step": ..., **metrics}`` rows to ``<output_dir>/metrics.jsonl`` and keeps them in memory."""

    def __init__(self, output_dir: str | Path, write: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.rows: list[dict] = []
        self.write = write  # False on the non-main ranks of a multi-process run: rows in memory only

    def resume(self, step: int) -> None:
        """Keep the rows of steps ``<= step`` (a resumed run rewrites what came after its checkpoint)."""
        if self.path.is_file():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r.get("step", 0) <= step]
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, step: int, metrics: dict) -> dict:
        row = {
            "step": step,
            **{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in metrics.items()},
        }
        self.rows.append(row)
        if not self.write:
            return row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        return row

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def plot(self, panels: dict[str, list[str]], filename: str, title: str = "") -> Path | None:
        """One subplot per panel (``{"loss": ["loss", "eval_loss"], ...}``); returns the PNG path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.write:
            return None
        panels = {name: keys for name, keys in panels.items() if any(self.series(k)[0] for k in keys)}
        if not panels:
            return None
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for ax, (name, keys) in zip(axes[0], panels.items()):
            for key in keys:
                steps, values = self.series(key)
                if steps:
                    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = self.path.parent / filename
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out
