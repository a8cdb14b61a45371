"""Drawing with numpy and Pillow only (no matplotlib): labelled image grids, viridis heat maps with their numbers,
line plots with axes, ticks and a legend; text in Pillow's default scalable font (Pillow ≥ 10.1)."""
from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE, INK, GREY = (255, 255, 255), (25, 25, 25), (110, 110, 110)
MASK_COLOR = (70, 100, 170)  # removed patches in the band (grey) views: blue, never a grey level of the scene
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]  # lines (tab10)
VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
                    (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)  # at 0, 1/8, ..., 1


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_size(text: str, size: int = 13) -> tuple:  # (width, line height): one size, one line height
    return math.ceil(font(size).getlength(text)), sum(font(size).getmetrics())


def draw_text(img: Image.Image, xy, text: str, size: int = 13, fill=INK, anchor: str = "la"):  # Pillow's anchors
    ImageDraw.Draw(img).text(xy, text, fill=fill, font=font(size), anchor=anchor)


def head(title: str, subtitle: str, sizes=(17, 12)) -> list:
    """The lines of a title (ink) and a subtitle (grey): [(text, size, colour, height)]."""
    lines = [(title, sizes[0], INK)] * bool(title) + [(t, sizes[1], GREY) for t in subtitle.split("\n") if subtitle]
    return [(t, size, fill, text_size(t, size)[1] + 3) for t, size, fill in lines]


def draw_head(img: Image.Image, x: int, y: int, lines: list, s: int = 1):
    for t, size, fill, h in lines:
        draw_text(img, (x, y), t, size * s, fill)
        y += h * s


def colormap(v, reverse: bool = False) -> np.ndarray:
    """Values in [0, 1] (any shape) → uint8 RGB [..., 3] of viridis (dark blue → yellow); reverse: the other way."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0, 1)
    at = np.linspace(0, 1, len(VIRIDIS))
    return np.round(np.stack([np.interp(1 - v if reverse else v, at, c) for c in VIRIDIS.T], -1)).astype(np.uint8)


def as_rgb(a) -> np.ndarray:
    a = np.asarray(a)
    return np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a


def image_grid(cells: list, row_labels: list, col_labels: list, title: str = "", subtitle: str = "",
               notes: list | None = None, with_layout: bool = False, gap: int = 8):
    """Pictures (uint8 [h, w(, 3)] or None: 'n/a') in labelled rows and columns under a title, notes[i][j] under each
    (or None) → Image (with_layout: and {'size', 'boxes': [[(x0, y0, x1, y1)]] by row and column})."""
    n_cols, m, lines = max(len(r) for r in cells), 12, head(title, subtitle)
    widths = [max([as_rgb(r[j]).shape[1] for r in cells if j < len(r) and r[j] is not None] or [64])
              for j in range(n_cols)]
    heights = [max([as_rgb(c).shape[0] for c in r if c is not None] or [64]) for r in cells]
    label_w, note_h = max([0] + [text_size(r)[0] + 8 for r in row_labels]), text_size("0", 12)[1] + 2 if notes else 0
    top = m + sum(h for *_, h in lines) + 6 * bool(lines) + (text_size("T")[1] + 6 if col_labels else 0)
    xs = [m + label_w + sum(widths[:j]) + gap * j for j in range(n_cols)]
    ys = [top + sum(heights[:i]) + (gap + note_h) * i for i in range(len(heights))]
    boxes = [[(x, y, x + w, y + h) for x, w in zip(xs, widths)] for y, h in zip(ys, heights)]
    width = max([xs[-1] + widths[-1] + m] + [2 * m + text_size(t, size)[0] for t, size, *_ in lines]
                + [x + (w + text_size(c)[0]) // 2 + m for x, w, c in zip(xs, widths, col_labels)])
    img = Image.new("RGB", (width, ys[-1] + heights[-1] + note_h + m), WHITE)
    draw_head(img, m, m, lines)
    for (x0, y0, x1, _), label in zip(boxes[0], col_labels):
        draw_text(img, ((x0 + x1) // 2, y0 - 4), label, anchor="md")
    for row, label in zip(boxes, row_labels):
        draw_text(img, (m + label_w - 8, (row[0][1] + row[0][3]) // 2), label, anchor="rm")
    for i, row in enumerate(cells):
        for j, (x0, y0, x1, y1) in enumerate(boxes[i]):
            c = row[j] if j < len(row) else None
            if c is None:
                draw_text(img, ((x0 + x1) // 2, (y0 + y1) // 2), "n/a", 12, GREY, anchor="mm")
            else:
                img.paste(Image.fromarray(as_rgb(c)), (x0, y0))
            if notes and notes[i][j]:
                draw_text(img, ((x0 + x1) // 2, y1 + 1), notes[i][j], 12, GREY, anchor="ma")
    return (img, dict(size=img.size, boxes=boxes)) if with_layout else img


def heatmap(values, row_labels, col_labels, title: str, subtitle: str, fmt: str, lo: float, hi: float,
            reverse: bool = False, with_layout: bool = False):
    """A matrix (None: n/a) as cells coloured over lo..hi (reverse: high is dark) with their numbers in fmt."""
    colours = [[(235, 235, 235) if v is None else colormap((v - lo) / ((hi - lo) or 1.0), reverse) for v in row]
               for row in values]
    texts = [["n/a" if v is None else fmt.format(v) for v in row] for row in values]
    w = max([64] + [text_size(c)[0] + 14 for c in col_labels] + [text_size(t, 14)[0] + 16 for r in texts for t in r])
    cells = [[np.full((max(30, text_size("0", 14)[1] + 12), w, 3), c, np.uint8) for c in row] for row in colours]
    img, lay = image_grid(cells, row_labels, col_labels, title, subtitle, with_layout=True, gap=1)
    for row, trow, crow, boxes in zip(values, texts, colours, lay["boxes"]):
        for v, t, c, (x0, y0, x1, y1) in zip(row, trow, crow, boxes):
            ink = GREY if v is None else INK if np.dot(c, (0.299, 0.587, 0.114)) > 140 else WHITE  # dark on light
            draw_text(img, ((x0 + x1) // 2, (y0 + y1) // 2), t, 14, ink, "mm")
    return (img, lay) if with_layout else img


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """About n round tick values in [lo, hi] (steps 1, 2, 2.5 or 5 × 10^k)."""
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step + 1e-9) + 1)]


def polyline(draw, pts, color, width: int, dash: int = 0):
    """A polyline; dash > 0: dashed, `dash` pixels on, `dash` off, along its length."""
    if not dash:
        return draw.line(pts, fill=color, width=width, joint="curve")
    p = np.asarray(pts, float)
    at = np.r_[0, np.cumsum(np.hypot(*np.diff(p, axis=0).T))]
    q = np.stack([np.interp(np.arange(0, at[-1], dash), at, p[:, i]) for i in (0, 1)], 1)
    for a, b in zip(q[::2], q[1::2]):
        draw.line([tuple(a), tuple(b)], fill=color, width=width)


def line_plot(series: list, xlim, ylim, title: str = "", xlabel: str = "", ylabel: str = "", size=(640, 400),
              note: str = "", legend: str = "upper") -> Image.Image:
    """Curves over xlim × ylim (cut there) with axes, ticks and a legend (at the 'upper' or 'lower' centre)."""
    # series: dicts {x, y, label, color (default: the next of COLORS), width, dash, bars (heights over x[i]..x[i+1])}
    s, lines = 2, head(title, note, (16, 11))  # s: supersampling
    series = [dict(d, color=d.get("color") or COLORS[k % len(COLORS)]) for k, d in enumerate(series)]
    size = (max([size[0]] + [90 + text_size(t, z)[0] for t, z, *_ in lines]), size[1])
    w, h = size[0] * s, size[1] * s
    img = Image.new("RGB", (w, h), WHITE)
    draw = ImageDraw.Draw(img)
    yticks, xticks, line_h = nice_ticks(*ylim), nice_ticks(*xlim), text_size("M")[1]
    left = (28 + max(text_size(f"{t:g}", 12)[0] for t in yticks)) * s
    top, right, bottom = (26 + line_h + sum(z for *_, z in lines)) * s, w - 16 * s, h - (24 + 2 * line_h) * s

    def px(x, yv):
        return (left + (x - xlim[0]) / (xlim[1] - xlim[0]) * (right - left),
                bottom - (yv - ylim[0]) / (ylim[1] - ylim[0]) * (bottom - top))

    for t in yticks:  # grid
        draw.line([(left, px(0, t)[1]), (right, px(0, t)[1])], fill=(232, 232, 232), width=s)
    for d in series:
        x, yv = np.asarray(d["x"], float), np.asarray(d["y"], float)
        for i in range(len(yv) if d.get("bars") else 0):
            (x0, y0), (x1, _) = px(x[i], min(yv[i], ylim[1])), px(x[i + 1], ylim[0])
            draw.rectangle([x0 + s, y0, x1 - s, bottom], fill=d["color"])
        if not d.get("bars"):
            polyline(draw, [px(*p) for p in zip(x, yv)], d["color"], d.get("width", 2) * s, 8 * s * bool(d.get("dash")))
    draw.rectangle([0, 0, w, top - 1], fill=WHITE)  # the curves cut at ylim: the margins painted over
    draw.rectangle([0, bottom + 1, w, h], fill=WHITE)
    draw_head(img, left, 12 * s, lines, s)
    for t in yticks:
        draw_text(img, (left - 8 * s, px(0, t)[1]), f"{t:g}", 12 * s, GREY, "rm")
    for t in xticks:
        draw_text(img, (px(t, 0)[0], bottom + 5 * s), f"{t:g}", 12 * s, GREY, "ma")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK, width=s)  # axes
    draw_text(img, ((left + right) // 2, h - 8 * s), xlabel, 13 * s, anchor="md")
    draw_text(img, (10 * s, top - 4 * s), ylabel, 13 * s, anchor="ld")  # over the y axis
    shown = [d for d in series if d.get("label")]
    if shown:  # the legend: a framed box inside the axes
        pad, sample, row_h = 8 * s, 26 * s, (line_h + 4) * s
        bw, bh = 3 * pad + sample + max(text_size(d["label"], 12 * s)[0] for d in shown), 2 * pad + row_h * len(shown)
        x, y = (left + right - bw) // 2, top + 6 * s if legend.startswith("upper") else bottom - bh - 8 * s
        draw.rectangle([x, y, x + bw, y + bh], fill=WHITE, outline=(200, 200, 200), width=s)
        for i, d in enumerate(shown):
            yy = y + pad + i * row_h + row_h // 2
            polyline(draw, [(x + pad, yy), (x + pad + sample, yy)], d["color"],
                     (10 if d.get("bars") else d.get("width", 2)) * s, 6 * s * bool(d.get("dash")))
            draw_text(img, (x + 2 * pad + sample, yy), d["label"], 12 * s, anchor="lm")
    return img.resize(size, Image.LANCZOS)


def upscale(a, k: int) -> np.ndarray:
    return np.asarray(a).repeat(k, 0).repeat(k, 1)


def small_png(img: Image.Image, path, colors: int = 256):  # a few tens of KB for these figures
    img.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
