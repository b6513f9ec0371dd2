"""What the PNGs show: every dot inside its frame, legends off the data, colour bars, readable colours, and
epoch axes in whole epochs as the log numbers them. Each figure is caught before it is saved."""

from __future__ import annotations


import numpy as np
import pytest

from fdpipe.analyze import report
from fdpipe.training import plots


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions make, drawn but not written."""
    caught = []

    def keep(fig, path):
        fig.canvas.draw()
        caught.append(fig)

    monkeypatch.setattr(report, "_save", keep)
    return caught


def checkpoint(label: str, distances: np.ndarray, uniform: float) -> dict:
    return {"label": label, "layers": len(distances), "attention_distance": distances.tolist(),
            "attention_distance_mean": distances.mean(1).tolist(), "uniform_attention_distance": uniform,
            "mean_attention_maps": {"key": label}}


def test_attention_distance_dots_sit_inside_the_frame_and_the_legend_off_the_data(figures, tmp_path):
    # at init every head sits at the uniform level, the largest value of the plot; one head attends only to itself
    at_init = checkpoint("run@init", np.full((12, 3), 0.85), 0.85)
    trained = checkpoint("run", np.array([[0.0, 0.5, 0.85]] * 12), 0.85)
    report.plot_distance(tmp_path / "d.png", [trained, at_init])
    fig = figures[0]
    for ax in fig.axes:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for points in ax.collections:
            xy = points.get_offsets()
            assert (xy[:, 0] > x0).all() and (xy[:, 0] < x1).all()
            pad = 0.02 * (y1 - y0)  # a dot's radius, about
            assert (xy[:, 1] > y0 + pad).all() and (xy[:, 1] < y1 - pad).all(), (ax.get_title(), y0, y1)
    renderer = fig.canvas.get_renderer()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1
    for ax in fig.axes:
        assert not legends[0].get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_attention_maps_have_a_colour_bar_and_near_uniform_maps_show_their_structure(figures, tmp_path):
    """At init and early in distillation every map is within a few percent of uniform: the colours must still
    spread over the scale (a 0-to-maximum scale drew each panel in one colour), with uniform at its centre."""
    patches = 16
    rng = np.random.default_rng(0)
    maps = {name: (1 + 0.03 * rng.standard_normal((2, patches, patches))) / patches for name in ("run", "run@init")}
    maps["run@init"][1] = 1 / patches  # exactly uniform
    cks = [checkpoint("run", np.ones((2, 3)), 1.0), checkpoint("run@init", np.ones((2, 3)), 1.0)]
    report.plot_maps(tmp_path / "m.png", cks, maps)
    fig = figures[0]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "uniform" in bars[0].get_ylabel()
    panels = [ax.images[0] for ax in fig.axes if ax.images and ax not in bars]
    assert len(panels) == 4
    shown = [im.norm(im.get_array()) for im in panels]
    for colours in shown[:3]:
        assert np.ptp(colours) > 0.5
    np.testing.assert_allclose(shown[3], 0.5, atol=1e-6)


def test_an_epoch_axis_has_whole_epoch_ticks(monkeypatch, tmp_path):
    import matplotlib.figure

    caught = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: caught.append(fig))
    plots.plot_curves(tmp_path / "a.png", {"top-1": ([0, 1], [40.0, 55.0]), "top-5": ([0, 1], [80.0, 90.0])},
                      "epoch", "held-out accuracy (%)", "fine-tuning")
    caught[0].canvas.draw()
    ax = caught[0].axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks == [0, 1], ticks
    assert all(line.get_marker() not in (None, "None", "") for line in ax.lines)  # two points are two dots
