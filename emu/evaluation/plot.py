"""Charts drawn with Pillow alone: line charts of training progress, stacked bars of win rates.

The training scripts append their losses to metrics.jsonl; a loss-curve PNG next to the checkpoints
shows at a glance whether a run is learning, without a plotting dependency (matplotlib) on a
training machine. plot_metrics reads such a log; plot_curves draws any {name: [(x, y), ...]}.
Non-finite values (a skipped step logs NaN) are gaps in the line and never stretch the axes.
plot_win_rates draws pairwise results as the paper's figures do: one bar per comparison, split into
win, tie and lose.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from emu.checkpoint import read_metrics
from emu.datasets.folders import save_png

# Series colours, in order; none is a grey, so they can't be confused with text, axes or grid.
# A chart with more series than colours reuses them.
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14),
          (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
BACKGROUND, INK, GRID = (255, 255, 255), (40, 40, 40), (228, 228, 228)
MARGINS = (64, 30, 20, 44)  # left, top, right, bottom: room for the tick labels, title and x label


# ----------------------------------------------------------------------------------------------------
# Axis ranges and ticks

def plottable(y, log_y=False):
    """Whether a y value is drawn: finite (and positive on a log axis); anything else is a gap."""
    return y is not None and math.isfinite(y) and (y > 0 or not log_y)


def y_range(points, log_y=False):
    """(lo, hi) of the drawable y values among (x, y) points, or None if there are none."""
    ys = [y for _, y in points if plottable(y, log_y)]
    return (min(ys), max(ys)) if ys else None


def nice_ticks(lo, hi, n=5):
    """About n+1 evenly spaced ticks, a step of 1, 2 or 5 x 10^k, from at or below lo to at or above hi."""
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):  # one value (to float precision): widen around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    # k * step rather than a running sum, so 0 is exactly 0 and errors don't pile up
    return [k * step for k in range(first, last + 1)]


def log_ticks(lo, hi, n=5):
    """Ticks for a log axis from at or below lo to at or above hi (both > 0): 1, 2, 5 x 10^k over one or
    two decades, powers of ten over more (every few decades, at most about n+1 ticks)."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    last = max(last, first + 1)
    if last - first <= 2:  # a loss curve often spans less than a decade: decades alone would give 2 ticks
        return [m * 10.0 ** e for e in range(first, last) for m in (1, 2, 5)] + [10.0 ** last]
    every = math.ceil((last - first) / max(n, 1))  # skip decades when the range spans many
    last = first + every * math.ceil((last - first) / every)
    return [10.0 ** e for e in range(first, last + 1, every)]


# ----------------------------------------------------------------------------------------------------
# Drawing

def plot_curves(path, series, title="", x_label="step", log_y=False, size=(640, 400)):
    """Draw each series of `series` ({name: [(x, y), ...]}) as a line in its own colour and write a PNG.

    Points where y is None, NaN or inf (or not positive with log_y) are gaps: the line breaks there and
    they are left out of the axis ranges; a point alone between gaps is a dot. With nothing to draw,
    the chart says "no data yet". Returns the number of points drawn.
    """
    width, height = size
    left, top, right, bottom = MARGINS[0], MARGINS[1], width - MARGINS[2], height - MARGINS[3]
    font = ImageFont.load_default()
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)

    def text(xy, s, anchor):
        draw.text(xy, s, fill=INK, font=font, anchor=anchor)

    # each series in order of x, with non-finite x dropped (it has no place on the axis)
    series = {name: sorted(((x, y) for x, y in points if x is not None and math.isfinite(x)), key=lambda p: p[0])
              for name, points in series.items()}
    drawn = [(x, y) for points in series.values() for x, y in points if plottable(y, log_y)]
    text((width / 2, top / 2), title, "mm")
    text(((left + right) / 2, height - 4), x_label, "md")

    traced = []  # points along every drawn line, to keep the legend off them
    if not drawn:
        draw.rectangle([left, top, right, bottom], outline=INK)
        text(((left + right) / 2, (top + bottom) / 2), "no data yet", "mm")
    else:
        x_ticks = nice_ticks(min(x for x, _ in drawn), max(x for x, _ in drawn))
        y_lo, y_hi = y_range(drawn, log_y)
        y_ticks = log_ticks(y_lo, y_hi) if log_y else nice_ticks(y_lo, y_hi)
        # on a log axis positions are linear in log10(y)
        scale_y = math.log10 if log_y else float
        x0, x1 = x_ticks[0], x_ticks[-1]
        y0, y1 = scale_y(y_ticks[0]), scale_y(y_ticks[-1])

        def to_pixel(x, y):
            return (left + (x - x0) / (x1 - x0) * (right - left),
                    bottom - (scale_y(y) - y0) / (y1 - y0) * (bottom - top))

        for x in x_ticks:
            px = to_pixel(x, y_ticks[0])[0]
            draw.line([(px, top), (px, bottom)], fill=GRID)
            draw.line([(px, bottom), (px, bottom + 4)], fill=INK)
            text((px, bottom + 6), f"{x:g}", "mt")
        for y in y_ticks:
            py = to_pixel(x0, y)[1]
            draw.line([(left, py), (right, py)], fill=GRID)
            draw.line([(left - 4, py), (left, py)], fill=INK)
            text((left - 6, py), f"{y:g}", "rm")
        draw.rectangle([left, top, right, bottom], outline=INK)

        for i, points in enumerate(series.values()):
            color = COLORS[i % len(COLORS)]
            # split at the gaps into runs of drawable points; each run is one polyline
            runs, run = [], []
            for x, y in points + [(None, None)]:
                if plottable(y, log_y):
                    run.append(to_pixel(x, y))
                elif run:
                    runs.append(run)
                    run = []
            for run in runs:
                traced += [(ax + (bx - ax) * k / 16, ay + (by - ay) * k / 16)
                           for (ax, ay), (bx, by) in zip(run, run[1:] + run[-1:]) for k in range(16)]
                if len(run) == 1:
                    (px, py), = run
                    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
                else:
                    draw.line(run, fill=color, width=2, joint="curve")

    # the legend, over a background box so the grid doesn't cross it, in the corner of the plot area that
    # hides the least of the lines: top-right unless the lines pass there
    if series:
        line_h = 14
        names = [str(name) for name in series]
        box_w = 28 + max(draw.textlength(name, font=font) for name in names)
        box_h = line_h * len(names) + 4
        corners = [(right - box_w - 6, top + 6), (right - box_w - 6, bottom - box_h - 6), (left + 6, top + 6),
                   (left + 6, bottom - box_h - 6)]
        hidden = [sum(cx - 3 <= x <= cx + box_w + 3 and cy - 3 <= y <= cy + box_h + 3 for x, y in traced)
                  for cx, cy in corners]
        bx, by = corners[hidden.index(min(hidden))]
        draw.rectangle([bx, by, bx + box_w, by + box_h], fill=BACKGROUND, outline=GRID)
        for i, name in enumerate(names):
            cy = by + 2 + line_h * i + line_h / 2
            draw.line([(bx + 4, cy), (bx + 20, cy)], fill=COLORS[i % len(COLORS)], width=3)
            text((bx + 24, cy), name, "lm")

    save_png(path, np.asarray(image))
    return len(drawn)


# win / tie / lose in the paper's figures' spirit: A's wins in a strong colour, ties grey, losses in a pale one
WIN_TIE_LOSE = {"win": (31, 119, 180), "tie": (200, 200, 200), "lose": (255, 160, 122)}


def plot_win_rates(path, rows, title="", size=(640, None)):
    """One horizontal bar per row of `rows` ([(label, {"win": %, "tie": %, "lose": %}), ...]), split into
    its win, tie and lose shares from left to right, each segment labelled with its percentage when it
    is wide enough. The bar spans the plot's width at 100%. Returns the pixel x where each row's
    segments start and end: [(x_win, x_tie, x_lose, x_end), ...]."""
    row_h, label_w = 26, 0
    width = size[0]
    height = size[1] or MARGINS[1] + 30 + row_h * len(rows) + 16
    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if rows:
        label_w = max(draw.textlength(str(label), font=font) for label, _ in rows) + 12
    left, right, top = 8 + label_w, width - MARGINS[2], MARGINS[1] + 24
    draw.text((width / 2, MARGINS[1] / 2), title, fill=INK, font=font, anchor="mm")
    x = left  # the legend, on one line above the bars
    for name, color in WIN_TIE_LOSE.items():
        draw.rectangle([x, MARGINS[1], x + 12, MARGINS[1] + 12], fill=color)
        draw.text((x + 16, MARGINS[1] + 6), name, fill=INK, font=font, anchor="lm")
        x += 24 + draw.textlength(name, font=font) + 12
    edges = []
    for i, (label, rates) in enumerate(rows):
        y0 = top + i * row_h
        y1 = y0 + row_h - 6
        draw.text((left - 8, (y0 + y1) / 2), str(label), fill=INK, font=font, anchor="rm")
        xs = [left]
        for name in WIN_TIE_LOSE:
            xs.append(xs[-1] + (right - left) * rates[name] / 100.0)
        for (name, color), a, b in zip(WIN_TIE_LOSE.items(), xs, xs[1:]):
            if b - a >= 1:
                draw.rectangle([round(a), y0, round(b) - 1, y1], fill=color)
            share = f"{rates[name]:.0f}%"
            if b - a > draw.textlength(share, font=font) + 4:
                draw.text(((a + b) / 2, (y0 + y1) / 2), share, fill=BACKGROUND if name == "win" else INK, font=font,
                          anchor="mm")
        edges.append(tuple(round(x) for x in xs))
    save_png(path, np.asarray(image))
    return edges


# ----------------------------------------------------------------------------------------------------
# Metrics logs

def metric_series(records, x_key, y_keys):
    """{y_key: [(x, y), ...] in order of x} from metrics records; "event" records are skipped.

    A resumed run redoes the steps after its last checkpoint, so the log can hold the same x twice:
    for each key the LAST record at an x is kept, the one that counts. (It is per key because one step
    can also have two records with different keys, e.g. a loss record and a held-out record.)
    A y that is None or not a number is a gap.
    """
    latest = {key: {} for key in y_keys}
    for record in records:
        x = record.get(x_key)
        if "event" in record or not isinstance(x, (int, float)):
            continue
        for key in y_keys:
            if key in record:
                y = record[key]
                latest[key][x] = float(y) if isinstance(y, (int, float)) else None
    return {key: sorted(points.items()) for key, points in latest.items()}


def plot_metrics(metrics_path, png_path, x_key, y_keys, title, log_y=False):
    """Plot `y_keys` of a metrics.jsonl log (see emu.checkpoint.append_metrics) against `x_key` as a PNG.

    Torn lines are skipped (read_metrics); for an x logged twice by a resumed run the last record wins
    (metric_series). Returns the number of points drawn.
    """
    if isinstance(y_keys, str):
        y_keys = [y_keys]
    series = metric_series(read_metrics(metrics_path), x_key, y_keys)
    return plot_curves(png_path, series, title=title, x_label=x_key, log_y=log_y)
