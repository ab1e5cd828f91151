"""The accuracy-against-latency chart stays readable whatever the values: rendered, its
tick labels do not overlap and every point's name lies inside the figure."""

from __future__ import annotations

import itertools

import pytest

from kdpipe.evaluation.report import accuracy_latency_figure


def doc(latencies: dict[str, float], accuracies: dict[str, float]) -> dict:
    return {"latency": {"batch_sizes": [1, 32]},
            "models": {name: {"latency_ms": {"b1": {"p50": latencies[name]}},
                              "accuracy": accuracies[name]} for name in latencies}}


CASES = {
    # SST-2-like: 0.16 ms to 50 ms, three students at nearly the same accuracy.
    "sst2": doc({"teacher": 49.6, "teacher_int8": 13.4, "student": 2.12, "pruned": 4.56,
                 "quantized": 0.16, "tfidf_lr": 0.66},
                {"teacher": 0.898, "teacher_int8": 0.893, "student": 0.8865, "pruned": 0.8842,
                 "quantized": 0.8853, "tfidf_lr": 0.892}),
    # Five decades: 0.01 ms (fastText-like) to 800 ms.
    "wide": doc({"fast": 0.01, "teacher": 800.0, "student": 0.3},
                {"fast": 0.81, "teacher": 0.91, "student": 0.89}),
    # Under one decade.
    "narrow": doc({"a": 1.1, "b": 1.9}, {"a": 0.5, "b": 0.6}),
}


@pytest.mark.parametrize("case", CASES)
def test_tick_labels_never_overlap_and_names_stay_inside(case):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = accuracy_latency_figure(CASES[case])
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        # Drawn labels: those of ticks inside the view, with text.
        ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
        labels = [tick.label1 for tick in ticks
                  if low <= tick.get_loc() <= high and tick.label1.get_visible()
                  and tick.label1.get_text()]
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert len(boxes) >= 2, f"{case}: fewer than two labelled ticks"
        for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels, strict=True), 2):
            assert not a.overlaps(b), f"{case}: {ta.get_text()!r} overlaps {tb.get_text()!r}"
    figure_box = fig.bbox
    for text in ax.texts:  # the points' names
        box = text.get_window_extent(renderer)
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1, text.get_text()
        assert figure_box.y0 <= box.y0 and box.y1 <= figure_box.y1, text.get_text()
