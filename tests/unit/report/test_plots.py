import base64
import io

import numpy as np
import pytest
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.container import BarContainer
from matplotlib.image import AxesImage

from harc.errors import HarcError
from harc.report import plots
from harc.stats import wilson as wilson_interval

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labelled_lines(ax):
    return [ln for ln in ax.lines if not ln.get_label().startswith("_")]


def _run(name, asr, filt=None, orr=(0.1, 0.2)):
    return {
        "name": name, "filter": filt,
        "attacks": {a: {"n": 100, "success": round(100 * v), "asr": v} for a, v in asr.items()},
        "over_refusal": {"xstest": {"n": 50, "refused": round(50 * orr[0]), "rate": orr[0]},
                         "pseudo": {"n": 50, "refused": round(50 * orr[1]), "rate": orr[1]}},
    }


def test_cos_layers_band_line_and_selected_markers():
    y = np.linspace(-0.1, 0.5, 9)
    fig = plots.plot_cos_layers(y, y - 0.05, y + 0.05, selected=[2, 5, 7])
    (ax,) = fig.axes
    (line,) = _labelled_lines(ax)
    np.testing.assert_allclose(line.get_ydata(), y)
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 1  # the CI band
    markers = [c for c in ax.collections if c.get_label() == "selected layers"]
    assert len(markers) == 1 and len(markers[0].get_offsets()) == 3
    assert "cos(v_ref, v_harm)" in ax.get_ylabel()


def test_cos_layers_accepts_tensors_and_rejects_empty():
    torch = pytest.importorskip("torch")
    fig = plots.plot_cos_layers(torch.zeros(4), torch.zeros(4), torch.ones(4))
    assert len(fig.axes) == 1
    with pytest.raises(HarcError):
        plots.plot_cos_layers([], [], [])


def test_layer_scores_are_normalised_with_band_and_selection():
    scores = {"variant_d": [0.0, 0.2, 0.4, 0.1], "legacy": [1.0, 4.0, 2.0, 3.0]}
    fig = plots.plot_layer_scores(scores, selected=[1, 2], band=(1, 2))
    (ax,) = fig.axes
    data = [ln for ln in _labelled_lines(ax) if ln.get_label() in ("variant d", "legacy")]
    assert len(data) == 2
    for ln in data:
        assert np.nanmax(ln.get_ydata()) == pytest.approx(1.0)
    vlines = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(vlines) == 2
    assert len(ax.patches) == 1  # the shaded band


def test_cross_cos_one_annotated_heatmap_per_layer():
    m = np.eye(4) * 0.5 + 0.25
    fig = plots.plot_cross_cos({21: m, 22: -m, 24: m})
    maps = [ax for ax in fig.axes if any(isinstance(i, AxesImage) for i in ax.images)]
    assert len(maps) == 3
    assert len(fig.axes) == 4  # plus one shared colour bar
    for ax in maps:
        assert len(ax.texts) == 16
        assert ax.images[0].get_clim() == (-1, 1)
    assert [ax.get_title() for ax in maps] == ["layer 21", "layer 22", "layer 24"]
    with pytest.raises(HarcError):
        plots.plot_cross_cos({3: np.eye(3)})


def test_plane_arrows_from_reference_to_each_family():
    rng = np.random.default_rng(0)
    pts = {n: rng.normal(size=(6, 2)) for n in
           ("harmless", "harmful (direct)", "pair", "pap")}
    fig = plots.plot_plane(pts, layer=12, limits=((-5, 5), (-4, 4)))
    (ax,) = fig.axes
    assert len(ax.collections) == 5  # four point clouds + one centroid scatter
    assert len(ax.patches) == 2  # arrows to pair and pap only
    assert ax.get_xlim() == (-5, 5) and ax.get_ylim() == (-4, 4)
    assert "layer 12" in ax.get_title(loc="left")
    assert "v_harm" in ax.get_xlabel() and "v_ref" in ax.get_ylabel()
    no_ref = plots.plot_plane({k: v for k, v in pts.items() if k != "harmful (direct)"}, 3)
    assert len(no_ref.axes[0].patches) == 0


def test_asr_bars_grouped_with_wilson_errors():
    runs = [_run("base", {"a": 0.5, "b": 0.7, "c": 0.2}), _run("harc", {"a": 0.1, "b": 0.2})]
    fig = plots.plot_asr_bars(runs)
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [len(b) for b in bars] == [3, 3]
    assert [p.get_height() for p in bars[0]] == pytest.approx([0.5, 0.7, 0.2])
    assert np.isnan(bars[1][2].get_height())  # harc has no attack c
    # the error bar of base/a spans the Wilson interval of 50/100 (derived: no "ci" given)
    segs = [c for c in ax.collections if isinstance(c, LineCollection)]
    ys = {round(float(v), 4) for s in segs for seg in s.get_segments()
          for v in np.asarray(seg).reshape(-1, 2)[:, 1]}
    lo, hi = wilson_interval(50, 100)
    assert round(lo, 4) in ys and round(hi, 4) in ys
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_tradeoff_one_labelled_point_per_run_and_policy():
    runs = [_run("base", {"a": 0.6}), _run("harc", {"a": 0.1}, orr=(0.02, 0.04)),
            _run("harc", {"a": 0.05}, filt="guard", orr=(0.1, 0.3)), {"name": "empty"}]
    fig = plots.plot_tradeoff(runs)
    (ax,) = fig.axes
    assert len(ax.collections) == 3
    labels = [t.get_text() for t in ax.texts if t.get_text() != "lower-left is better"]
    assert labels == ["base", "harc", "harc + guard"]
    assert ax.collections[1].get_offsets()[0].tolist() == pytest.approx([0.03, 0.1])
    with pytest.raises(HarcError):
        plots.plot_tradeoff([{"name": "x"}])


def test_training_one_panel_per_term():
    log = [{"step": s, "loss": 1 / (s + 1), "couple": 0.5, "kl": 0.01 * s, "lr": 1e-4,
            "wall_s": 3.0} for s in range(0, 100, 10)]
    fig = plots.plot_training(log)
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["loss", "couple", "kl", "lr"]
    lr_ax = fig.axes[-1]
    assert lr_ax.lines[0].get_drawstyle() == "steps-post"  # schedules are not smoothed
    long = [{"step": s, "loss": float(s % 7)} for s in range(200)]
    ax = plots.plot_training(long).axes[0]
    assert len(ax.lines) == 2  # raw trace + smoothed
    with pytest.raises(HarcError):
        plots.plot_training([])


def test_geometry_before_after_two_lines_with_bands():
    g = {"cos_ref_harm": [0.1, 0.3, 0.2], "ci_lo": [0, 0.2, 0.1], "ci_hi": [0.2, 0.4, 0.3],
         "selected_layers": [1]}
    after = {"cos_ref_harm": [0.1, 0.5, 0.4], "selected_layers": [1, 2]}
    fig = plots.plot_geometry_before_after(g, after)
    (ax,) = fig.axes
    assert [ln.get_label() for ln in _labelled_lines(ax)] == ["before (base)", "after (HARC)"]
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 1  # only before has CI
    with pytest.raises(HarcError):
        plots.plot_geometry_before_after({}, {})


def test_png_bytes_data_uri_and_atomic_save(tmp_path):
    fig = plots.plot_cos_layers([0.1, 0.2], [0, 0.1], [0.2, 0.3])
    png = plots.fig_to_png_bytes(fig)
    assert png.startswith(PNG_MAGIC)
    uri = plots.fig_to_data_uri(fig)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == png
    out = tmp_path / "sub" / "cos.png"
    out.parent.mkdir()
    out.write_bytes(b"old")
    plots.plot_cos_layers([0.1, 0.2], [0, 0.1], [0.2, 0.3], save=out)
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in out.parent.iterdir()] == ["cos.png"]  # no temp file left
    from PIL import Image

    w, h = Image.open(io.BytesIO(png)).size
    assert (w, h) == (round(7.5 * plots.DPI), round(3.6 * plots.DPI))


def test_tradeoff_plane_labels_cover_neither_each_other_nor_other_points():
    from matplotlib.text import Text

    from harc.report.tradeoff import plot_tradeoff_plane

    # A dense cluster, like a compare report's trained methods: every label must stay legible and
    # beside no other policy's point; a label moved away gets a leader line to its own point.
    pts = [{"name": f"policy-{i}", "kind": "method", "x": 0.45 + 0.012 * (i % 4),
            "x_ci": (0.4, 0.5), "y": 0.42 + 0.015 * (i // 4), "y_ci": (0.38, 0.46),
            "pareto": i == 0} for i in range(12)]
    fig = plot_tradeoff_plane(pts)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in ax.texts if t.get_text().startswith("policy-")]
    assert len(texts) == 12
    # The text's own box (an annotation's extent would include its leader line).
    boxes = [Text.get_window_extent(t, renderer) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    dots = {p["name"]: ax.transData.transform((p["x"], p["y"])) for p in pts}
    for t, box in zip(texts, boxes, strict=True):
        others = [xy for name, xy in dots.items() if name != t.get_text()]
        assert not any(box.contains(*xy) for xy in others), t.get_text()
    assert any(t.arrow_patch is not None for t in texts)
