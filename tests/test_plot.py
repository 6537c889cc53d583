import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from emu.checkpoint import append_metrics
from emu.evaluation.plot import (COLORS, MARGINS, WIN_TIE_LOSE, log_ticks, metric_series, nice_ticks, plot_curves,
                                 plot_metrics, plot_win_rates, y_range)


def read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def has_color(region, color):
    return bool((region == np.array(color, dtype=np.uint8)).all(axis=-1).any())


def plot_area(image):
    """The image cropped to the inside of the axes frame."""
    h, w = image.shape[:2]
    left, top, right, bottom = MARGINS
    return image[top + 1:h - bottom, left + 1:w - right]


def is_nice_step(step):
    mantissa = step / 10.0 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, m) for m in (1, 2, 5))


def test_decreasing_series_goes_from_upper_left_to_lower_right(tmp_path):
    path = tmp_path / "loss.png"
    plot_curves(path, {"loss": [(s, 2.0 - s / 100) for s in range(101)]}, title="loss", size=(500, 300))
    image = read_rgb(path)
    assert image.shape == (300, 500, 3)
    area = plot_area(image)
    h, w = area.shape[:2]
    assert has_color(area[:h // 4, :w // 4], COLORS[0])
    assert has_color(area[-h // 4:, -w // 4:], COLORS[0])
    assert not has_color(area[-h // 3:, :w // 3], COLORS[0])  # a rising line would pass here


def test_two_series_get_distinct_colors_and_named_legend(tmp_path):
    a = [(s, 1.0 / (s + 1)) for s in range(50)]
    b = [(s, 0.5 / (s + 1)) for s in range(50)]
    assert COLORS[0] != COLORS[1]
    plot_curves(tmp_path / "two.png", {"train": a, "heldout": b})
    image = read_rgb(tmp_path / "two.png")
    area = plot_area(image)
    lower_half = area[area.shape[0] // 2:]  # where both lines are, away from the legend's swatches
    assert has_color(lower_half, COLORS[0]) and has_color(lower_half, COLORS[1])
    h, w = area.shape[:2]
    legend = area[:h // 4, -w // 4:]  # both lines are low by then: only the legend's swatches are here
    assert has_color(legend, COLORS[0]) and has_color(legend, COLORS[1])
    # the same data under anagrams of the names (same letters, same width, same legend box):
    # only the text drawn in the legend can differ
    font, draw = ImageFont.load_default(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert draw.textlength("train", font=font) == draw.textlength("trian", font=font)
    plot_curves(tmp_path / "renamed.png", {"trian": a, "heldout": b})
    assert not np.array_equal(image, read_rgb(tmp_path / "renamed.png"))
    plot_curves(tmp_path / "one.png", {"train": a})
    one = read_rgb(tmp_path / "one.png")
    assert has_color(one, COLORS[0]) and not has_color(one, COLORS[1])


def test_nice_ticks_are_1_2_5_steps_covering_the_range():
    for lo, hi in [(0, 1), (0.13, 0.87), (-7, 1234), (3, 3), (0, 0), (1e-6, 3e-6), (-2.5, -0.1), (999, 1001)]:
        ticks = nice_ticks(lo, hi, 5)
        assert len(ticks) >= 2 and ticks[0] <= lo and ticks[-1] >= hi
        steps = np.diff(ticks)
        assert np.allclose(steps, steps[0]) and is_nice_step(steps[0])
        assert len(ticks) <= 2 * 5 + 1
    assert np.allclose(nice_ticks(0, 1, 5), [0, 0.2, 0.4, 0.6, 0.8, 1])
    assert np.allclose(nice_ticks(-7, 1234, 5), [-500, 0, 500, 1000, 1500])


def test_log_ticks_cover_the_range_in_1_2_5_or_decade_steps():
    assert np.allclose(log_ticks(0.3, 0.9), [0.1, 0.2, 0.5, 1.0])
    ticks = log_ticks(1e-5, 3)
    assert ticks[0] <= 1e-5 and ticks[-1] >= 3
    assert all(math.isclose(math.log10(t), round(math.log10(t))) for t in ticks)


def test_non_finite_values_are_left_out_of_the_range():
    points = [(0, 1.0), (1, 0.5), (2, 0.25)]
    with_gaps = points + [(3, float("nan")), (4, float("inf")), (5, -float("inf")), (6, None)]
    assert y_range(with_gaps) == y_range(points) == (0.25, 1.0)
    assert y_range([(0, float("nan"))]) is None and y_range([]) is None
    assert y_range([(0, 0.0), (1, -1.0), (2, 0.1), (3, 10.0)], log_y=True) == (0.1, 10.0)


def test_trailing_nan_and_inf_leave_the_image_unchanged(tmp_path):
    points = [(s, 1.0 + math.sin(s / 5)) for s in range(40)]
    plot_curves(tmp_path / "clean.png", {"loss": points})
    # at new x values too: a gap at the end must not stretch the x axis either
    plot_curves(tmp_path / "gaps.png", {"loss": points + [(40, float("nan")), (41, float("inf")), (60, -float("inf"))]})
    assert np.array_equal(read_rgb(tmp_path / "clean.png"), read_rgb(tmp_path / "gaps.png"))


def test_nan_breaks_the_line(tmp_path):
    # a straight line from (0, 0) to (20, 20); with the middle point NaN nothing is drawn in between
    line = [(x, float(x)) for x in (0, 10, 20)]
    gap = [(0, 0.0), (10, float("nan")), (20, 20.0)]
    plot_curves(tmp_path / "line.png", {"loss": line})
    plot_curves(tmp_path / "gap.png", {"loss": gap})
    whole, broken = plot_area(read_rgb(tmp_path / "line.png")), plot_area(read_rgb(tmp_path / "gap.png"))
    h, w = whole.shape[:2]
    middle = (slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))
    assert has_color(whole[middle], COLORS[0]) and not has_color(broken[middle], COLORS[0])
    # the end points are still drawn, as dots; (0, 0) is in the lower-left corner, far from the legend
    assert has_color(broken[-h // 8:, :w // 8], COLORS[0])


def test_single_point_draws_a_dot(tmp_path):
    assert plot_curves(tmp_path / "one.png", {"loss": [(5, 0.3)]}) == 1
    area = plot_area(read_rgb(tmp_path / "one.png"))
    h, w = area.shape[:2]
    assert has_color(area[h // 3:2 * h // 3, w // 3:2 * w // 3], COLORS[0])  # the axes centre on it


def test_log_axis_makes_exponential_decay_a_straight_line(tmp_path):
    decay = {"loss": [(s, 10.0 ** (-s / 100 * 3)) for s in range(101)]}  # 1 down to 1e-3
    plot_curves(tmp_path / "log.png", decay, log_y=True)
    plot_curves(tmp_path / "linear.png", decay)
    centre = []
    for name in ("log.png", "linear.png"):
        area = plot_area(read_rgb(tmp_path / name))
        h, w = area.shape[:2]
        centre.append(has_color(area[2 * h // 5:3 * h // 5, 2 * w // 5:3 * w // 5], COLORS[0]))
    assert centre == [True, False]  # on a linear axis the curve hugs the bottom long before mid-way


def test_empty_input_writes_a_png(tmp_path):
    for i, series in enumerate([{}, {"loss": []}, {"loss": [(1, float("nan")), (2, None)]},
                                {"loss": [(1, 0.0), (2, -1.0)]}]):
        path = tmp_path / f"empty{i}.png"
        assert plot_curves(path, series, title="nothing", log_y=(i == 3), size=(320, 200)) == 0
        image = read_rgb(path)
        assert image.shape == (200, 320, 3)
        area = plot_area(image)
        h, w = area.shape[:2]
        assert (area[h // 3:2 * h // 3, w // 4:3 * w // 4] < 128).any()  # the "no data yet" note in the middle


def test_metric_series_keeps_the_last_record_of_each_step():
    records = [{"event": "start", "step": 0, "time": 1.0},
               {"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.8, "heldout": 0.85},
               {"event": "resume", "step": 1, "time": 2.0},
               {"step": 2, "loss": 0.7}, {"step": 3, "loss": None}, {"iter": 4, "loss": 0.1}]
    series = metric_series(records, "step", ["loss", "heldout"])
    assert series["loss"] == [(1, 0.9), (2, 0.7), (3, None)]
    assert series["heldout"] == [(2, 0.85)]  # the redone step had no held-out value: the earlier one stays


def test_plot_metrics_reads_a_torn_resumed_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    append_metrics(log, {"event": "start", "step": 0, "time": 0.0})
    for step in range(1, 6):
        append_metrics(log, {"step": step, "loss": float("nan") if step == 5 else 1.0 / step, "sec_per_step": 0.1})
    with open(log, "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # a crash mid-write
    append_metrics(log, {"event": "resume", "step": 4, "time": 9.0})
    for step in range(5, 8):  # step 5 is redone, and this time its loss is finite
        append_metrics(log, {"step": step, "loss": 1.0 / step, "sec_per_step": 0.1})
    png = tmp_path / "loss.png"
    # steps 1..7 once each; had the first step-5 record (NaN) won, only 6 would be drawn
    assert plot_metrics(log, png, "step", ["loss"], "pretrain") == 7
    assert has_color(read_rgb(png), COLORS[0])
    assert plot_metrics(log, tmp_path / "two.png", "step", ["loss", "sec_per_step"], "pretrain") == 7 + 7


def test_win_rate_bars_are_split_in_proportion_to_the_rates(tmp_path):
    rows = [("appeal", {"win": 60.0, "tie": 10.0, "lose": 30.0}), ("faithfulness, a longer label", {"win": 0.0, "tie": 50.0, "lose": 50.0})]
    edges = plot_win_rates(tmp_path / "bars.png", rows, title="A vs B")
    image = read_rgb(tmp_path / "bars.png")
    for (x_win, x_tie, x_lose, x_end), (_, rates) in zip(edges, rows):
        span = x_end - edges[0][0]
        assert x_win == edges[0][0] and abs(span - (edges[0][3] - edges[0][0])) <= 1  # every bar is 100% wide
        assert abs((x_tie - x_win) - span * rates["win"] / 100) <= 1 and abs((x_lose - x_tie) - span * rates["tie"] / 100) <= 1
    (x_win, x_tie, x_lose, x_end), = edges[:1]
    bar = image[MARGINS[1] + 24 + 2]  # a row of pixels through the first bar, above its labels
    assert has_color(bar[x_win + 1:x_win + 4][None], WIN_TIE_LOSE["win"])
    assert has_color(bar[x_tie + 1:x_tie + 4][None], WIN_TIE_LOSE["tie"])
    assert has_color(bar[x_end - 4:x_end - 1][None], WIN_TIE_LOSE["lose"])
    second = image[MARGINS[1] + 24 + 26 + 2]  # no wins: the second bar starts grey
    assert has_color(second[edges[1][0] + 1:edges[1][0] + 4][None], WIN_TIE_LOSE["tie"])
    assert not has_color(second[:, None], WIN_TIE_LOSE["win"])


def test_legend_moves_to_the_corner_the_lines_leave_free(tmp_path):
    rising = {"up": [(0, 0.0), (1, 1.0)], "up too": [(0, 0.1), (1, 0.9)]}  # the lines end top-right
    plot_curves(tmp_path / "rising.png", rising)
    area = plot_area(read_rgb(tmp_path / "rising.png"))
    h, w = area.shape[:2]
    bottom_right, top_left = area[-h // 5:, -w // 4:], area[:h // 5, :w // 4]
    # the swatches are in the bottom-right corner, where no line passes; the top-left has none of them
    assert has_color(bottom_right, COLORS[0]) and has_color(bottom_right, COLORS[1])
    assert not has_color(top_left, COLORS[0])
