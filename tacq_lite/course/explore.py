"""Figures and interactive explorers used by the notebooks.

Each explorer is a plain plotting function plus an ipywidgets front: in JupyterLab the
sliders redraw the figure; where no widget front end runs (papermill, nbval, a static
render on GitHub) `explore` also draws one static snapshot so the page is never empty.
"""
from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import torch

from ..core.quant import dequantize, find_params, quantize

logger = logging.getLogger(__name__)

# One colour per method and selector across every notebook's figures, so that "green" means TaCQ in
# notebook 02 as in 07. Selector names are those of algo/selectors.py; "fp" is the float model and
# "none" a mask that keeps nothing (plain RTN/GPTQ at the same bits). Variants of a method
# ("TaCQ task", "tacq 2-bit") take their method's colour through `method_color`.
METHOD_COLORS = {
    "fp": "0.35",
    "rtn": "tab:orange",
    "gptq": "tab:blue",
    "none": "tab:blue",
    "tacq": "tab:green",
    "qal": "tab:olive",
    "msg": "tab:cyan",
    "gradient": "tab:purple",
    "fisher": "tab:pink",
    "hessian": "tab:brown",
    "magnitude": "tab:red",
    "activation": "goldenrod",
    "owq_columns": "darkslateblue",
    "random": "0.65",
}


def method_color(name: str) -> str:
    """The course's colour for a method or selector; a longer label ("TaCQ task", "gptq_3") takes the
    colour of the first known name it starts with (case-insensitive). Unknown names raise, so a figure
    never silently falls back to matplotlib's cycle."""
    key = name.strip().lower()
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    for known in sorted(METHOD_COLORS, key=len, reverse=True):  # "owq_columns" before "owq"-like prefixes
        if key.startswith(known):
            return METHOD_COLORS[known]
    raise KeyError(f"no course colour for {name!r}; add it to tacq_lite.course.explore.METHOD_COLORS.")


def plot_rtn(W: torch.Tensor, bits: int = 3, groupsize: int = -1, *, row: int = 0, ax=None):
    """Histogram of one row of W with its quantization grid (first group) overlaid."""
    scale, zero = find_params(W, bits=bits, groupsize=groupsize)  # [rows, n_groups]
    W_hat = dequantize(quantize(W, scale, zero, bits=bits), scale, zero)  # [rows, cols]
    rel_err = ((W_hat - W).pow(2).sum() / W.pow(2).sum()).item()
    levels = scale[row, 0] * (torch.arange(2**bits) - zero[row, 0])  # [2**bits] grid of the first group
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    ax.hist(W[row].numpy(), bins=80, color="tab:blue", alpha=0.7, label=f"row {row} weights")
    for i, level in enumerate(levels.tolist()):
        ax.axvline(level, color="tab:red", lw=1, alpha=0.8, label="grid (first group)" if i == 0 else None)
    gs = "per channel" if groupsize == -1 else f"groups of {groupsize}"
    ax.set(xlabel="weight value", ylabel="count",
           title=f"{bits}-bit RTN, {gs}: relative squared error {rel_err:.4f}")
    ax.legend(loc="upper right", fontsize=8)
    return ax


def explore(plot_fn, *, static: dict, **controls):
    """Show `plot_fn` behind sliders/dropdowns, then a static snapshot at `static` settings.

    controls: name -> list of options (a dropdown/slider each). Returns the widget, or None
    when ipywidgets is missing.
    """
    from IPython.display import display

    widget = None
    try:
        import ipywidgets as widgets

        def draw(**kw):
            plot_fn(**kw)
            plt.show()

        sliders = {
            name: widgets.SelectionSlider(options=list(opts), value=static.get(name, opts[0]), description=name)
            for name, opts in controls.items()
        }
        widget = widgets.interactive(draw, **sliders)
        display(widget)
    except ImportError:
        logger.warning("ipywidgets is not installed: showing the static view only.")
    print(f"Static snapshot ({', '.join(f'{k}={v}' for k, v in static.items())}):")
    plot_fn(**static)
    plt.show()
    return widget
