"""The diagnose figures and `diagnose.json` (geometry from `harc.geometry`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harc.io import atomic_write_json
from harc.report import plots


def write_plots(geo: dict, out_dir: Path, plane: dict | None = None) -> list[Path]:
    """The diagnose figures as PNG files in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sel = geo["selected_layers"]
    figs = {
        "cos_ref_harm.png": plots.plot_cos_layers(geo["ci_mean"], geo["ci_lo"], geo["ci_hi"], sel),
        "layer_scores.png": plots.plot_layer_scores(
            {"variant D": geo["score_variant_d"], "legacy": geo["score_legacy"]}, sel,
            band=(geo["band"][0], geo["band"][-1]) if geo["band"] else None),
    }
    if sel:
        figs["cross_cos.png"] = plots.plot_cross_cos({s: geo["cross_cos"][s] for s in sel})
    if plane:
        figs["plane.png"] = plots.plot_plane(
            {k: np.asarray(v) for k, v in plane["points"].items()}, plane["layer"])
    paths = []
    for name, fig in figs.items():
        path = out_dir / name
        plots.save_figure(fig, path)
        paths.append(path)
    return paths


def write_diagnosis(out_dir: Path, geo: dict, heldout: dict | None, plane: dict | None) -> Path:
    return atomic_write_json(out_dir / "diagnose.json",
                             {"geometry": geo, "heldout": heldout, "plane": plane})
