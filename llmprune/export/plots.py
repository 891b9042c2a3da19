"""Per-layer plots of a finished run (`llmprune report OUT`): achieved sparsity, reconstruction error of each
module, and seconds per layer, drawn with matplotlib from llmprune.json into OUT/plots/."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from llmprune.errors import LLMPruneError

PLOTS_DIR = "plots"
PNG_NAME = "layers.png"
HTML_NAME = "layers.html"


def _series(report: dict) -> dict:
    """What the report has per layer: sparsity, seconds, and each module kind's error."""
    layers = report.get("layers") or []
    indices = [layer.get("index", i) for i, layer in enumerate(layers)]
    errors: dict[str, list[tuple[int, float]]] = {}
    for index, layer in zip(indices, layers):
        for module in layer.get("modules", []):
            if module.get("error") is not None:
                kind = ".".join(module["name"].split(".")[-2:])
                errors.setdefault(kind, []).append((index, module["error"]))
    return {
        "layers": indices,
        "sparsity": [layer.get("sparsity") for layer in layers],
        "seconds": [layer.get("seconds") for layer in layers],
        "errors": errors,
    }


def write_plots(folder: Path, report: dict, formats: tuple[str, ...]) -> list[Path]:
    """Write OUT/plots/layers.png (and layers.html with --format html); returns the files written."""
    series = _series(report)
    if not series["layers"]:
        raise LLMPruneError(f"{folder}: the report has no per-layer results to plot")
    try:
        import matplotlib
    except ImportError as exc:
        raise LLMPruneError("plots need matplotlib: pip install 'llmprune[plots]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("achieved sparsity", lambda ax: ax.plot(series["layers"], series["sparsity"], marker="o")),
        ("reconstruction error ‖(W−W′)X‖²/‖WX‖²", lambda ax: _errors(ax, series["errors"])),
        ("seconds per layer", lambda ax: ax.bar(series["layers"], [s or 0 for s in series["seconds"]])),
    ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True)
    for ax, (title, draw) in zip(axes, panels):
        draw(ax)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("decoder layer")
    figure.suptitle(f"{report.get('model', '')}: {report.get('method', '')} {report.get('pattern', '')}", fontsize=11)
    figure.tight_layout()
    out = Path(folder) / PLOTS_DIR
    out.mkdir(exist_ok=True)
    png = out / PNG_NAME
    figure.savefig(png, dpi=110)
    plt.close(figure)
    written = [png]
    if "html" in formats:
        page = out / HTML_NAME
        encoded = base64.b64encode(png.read_bytes()).decode()
        title = html.escape(f"{report.get('model', '')} — per-layer results")
        page.write_text(
            f"<!doctype html><meta charset='utf-8'><title>{title}</title><h1>{title}</h1>"
            f"<img alt='per-layer plots' src='data:image/png;base64,{encoded}'>\n"
        )
        written.append(page)
    return written


def _errors(ax, errors: dict[str, list[tuple[int, float]]]) -> None:
    for kind, points in sorted(errors.items()):
        ax.plot([i for i, _ in points], [e for _, e in points], marker=".", label=kind)
    if errors:
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
