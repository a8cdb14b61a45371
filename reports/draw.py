"""Drawing with numpy and Pillow only (no matplotlib): text in Pillow's scalable font, viridis, heat maps with their
numbers in the cells, line plots with axes, ticks and a legend, labelled image grids."""
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


@functools.lru_cache(maxsize=4096)
def text_mask(text: str, size: int = 13) -> Image.Image:
    """The text as an 8-bit mask, one line box high (Pillow ≥ 10.1's Aileron): texts of one size share a baseline."""
    f = ImageFont.load_default(size=size)
    ascent, descent = f.getmetrics()
    mask = Image.new("L", (max(1, math.ceil(f.getlength(text))), ascent + descent))
    ImageDraw.Draw(mask).text((0, 0), text, font=f, fill=255)
    return mask


def text_size(text: str, size: int = 13) -> tuple:
    return text_mask(text, size).size


def draw_text(img: Image.Image, xy, text: str, size: int = 13, fill=INK, anchor: str = "lt", rotate: int = 0):
    """Text at xy; anchor: l/m/r then t/m/b of the line box; rotate 90: bottom to top."""
    mask = text_mask(text, size)
    if rotate:
        mask = mask.rotate(rotate, expand=True)
    w, h = mask.size
    x = xy[0] - {"l": 0, "m": w // 2, "r": w}[anchor[0]]
    y = xy[1] - {"t": 0, "m": h // 2, "b": h}[anchor[1]]
    img.paste(Image.new("RGB", mask.size, fill), (int(x), int(y)), mask)


def text_block(lines: list, size: int) -> int:
    """Height of lines of text at `size`, with 3 px between them."""
    return sum(text_size(s, size)[1] + 3 for s in lines)


def draw_title(img: Image.Image, x: int, y: int, title: str, subtitle: str, sizes=(17, 12), s: int = 1):
    """The title and the subtitle's lines (grey) from (x, y), at sizes × s → the y below."""
    lines = [(title, sizes[0], INK)] if title else []
    lines += [(t, sizes[1], GREY) for t in subtitle.split("\n") if subtitle]
    for line, size, fill in lines:
        draw_text(img, (x, y), line, size * s, fill)
        y += text_block([line], size) * s
    return y


def draw_frame(img: Image.Image, lay: dict, title: str, subtitle: str, row_labels: list, col_labels: list):
    """The title, the column labels over the first row of boxes, each row's label left of it."""
    draw_title(img, 12, 12, title, subtitle)
    boxes = lay["boxes"]
    for j, label in enumerate(col_labels if boxes else []):
        x0, y0, x1, _ = boxes[0][j]
        draw_text(img, ((x0 + x1) // 2, y0 - 4), label, 13, anchor="mb")
    for label, row in zip(row_labels, boxes):
        draw_text(img, (lay["row_label_x"], (row[0][1] + row[0][3]) // 2), label, 13, anchor="rm")


def colormap(v, reverse: bool = False) -> np.ndarray:
    """Values in [0, 1] (any shape) → uint8 RGB [..., 3] of viridis (dark blue → yellow); reverse: the other way."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0, 1)
    v = 1 - v if reverse else v
    pos = v * (len(VIRIDIS) - 1)
    i = np.minimum(pos.astype(int), len(VIRIDIS) - 2)
    frac = (pos - i)[..., None]
    return np.round(VIRIDIS[i] * (1 - frac) + VIRIDIS[i + 1] * frac).astype(np.uint8)


def ink_on(rgb) -> tuple:
    """Dark text on light colours, white text on dark ones."""
    r, g, b = (int(c) for c in rgb)
    return INK if 0.299 * r + 0.587 * g + 0.114 * b > 140 else WHITE


def fmt_value(v, fmt) -> str:
    """A cell's text: fmt (a format string or a function) of the value; None → 'n/a'."""
    if v is None:
        return "n/a"
    return fmt(v) if callable(fmt) else fmt.format(v)


def heatmap(values, row_labels, col_labels, title: str = "", subtitle: str = "", fmt="{:.1f}", vmin=None,
            vmax=None, reverse: bool = False, with_layout: bool = False):
    """A matrix [rows][cols] (None = n/a) as coloured cells with their numbers, labelled rows and columns, a title,
    a colour bar over vmin..vmax (default: the values'); reverse: the highest value darkest → Image (with_layout: and
    its grid_layout, with 'bar')."""
    texts = [fmt_value(v, fmt) for row in values for v in row]
    cell_w = max([64] + [text_size(c, 13)[0] + 14 for c in col_labels] + [text_size(t, 14)[0] + 16 for t in texts])
    cell_h = max(30, text_size("0", 14)[1] + 12)
    lay = grid_layout([cell_w] * len(col_labels), [cell_h] * len(row_labels), row_labels, col_labels, title, subtitle,
                      gap=0)
    (_, top, x1, _), bottom = lay["boxes"][0][-1], lay["boxes"][-1][0][3]
    lay["bar"] = (x1 + 12, top, x1 + 26, bottom)
    bar_labels = max(text_size(t, 11)[0] for t in texts + [fmt_value(100.0, fmt)])
    lay["size"] = (max(lay["size"][0], x1 + 26 + 6 + bar_labels + 12), lay["size"][1])
    img = Image.new("RGB", lay["size"], WHITE)
    draw = ImageDraw.Draw(img)
    draw_frame(img, lay, title, subtitle, row_labels, col_labels)
    known = [v for row in values for v in row if v is not None]
    lo = min(known) if vmin is None and known else (vmin if vmin is not None else 0.0)
    hi = max(known) if vmax is None and known else (vmax if vmax is not None else 1.0)
    span = (hi - lo) or 1.0
    for i in range(len(row_labels)):
        for j, v in enumerate(values[i]):
            box = lay["boxes"][i][j]
            rgb = (235, 235, 235) if v is None else tuple(int(c) for c in colormap((v - lo) / span, reverse))
            draw.rectangle(box, fill=rgb, outline=WHITE, width=1)
            draw_text(img, ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), fmt_value(v, fmt), 14,
                      GREY if v is None else ink_on(rgb), anchor="mm")
    bx0, by0, bx1, by1 = lay["bar"]
    ramp = colormap(np.linspace(1, 0, by1 - by0)[:, None].repeat(bx1 - bx0, 1), reverse)  # top = hi
    img.paste(Image.fromarray(ramp), (bx0, by0))
    draw_text(img, (bx1 + 4, by0), fmt_value(hi, fmt), 11, GREY)
    draw_text(img, (bx1 + 4, by1), fmt_value(lo, fmt), 11, GREY, anchor="lb")
    return (img, lay) if with_layout else img


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """About n round tick values in [lo, hi] (steps 1, 2, 2.5 or 5 × 10^k)."""
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step + 1e-9) + 1)]


def clip_polyline(points: list, y0: float, y1: float) -> list:
    """Cut a polyline [(x, y)] to y0 ≤ y ≤ y1 → its visible pieces (lists of points), ends on the border."""
    pieces, cur = [], []
    for (xa, ya), (xb, yb) in zip(points[:-1], points[1:]):
        ta, tb = 0.0, 1.0
        for edge, a_outside in ((y0, ya < y0), (y1, ya > y1)):  # shorten the segment to the band between edges
            if (ya - edge) * (yb - edge) < 0:
                t = (edge - ya) / (yb - ya)
                ta, tb = (max(ta, t), tb) if a_outside else (ta, min(tb, t))
        a = (xa + ta * (xb - xa), ya + ta * (yb - ya))
        b = (xa + tb * (xb - xa), ya + tb * (yb - ya))
        mid = (a[1] + b[1]) / 2
        if not (y0 - 1e-9 <= mid <= y1 + 1e-9):
            if len(cur) > 1:
                pieces.append(cur)
            cur = []
            continue
        if not cur or cur[-1] != a:
            if len(cur) > 1:
                pieces.append(cur)
            cur = [a]
        cur.append(b)
    if len(cur) > 1:
        pieces.append(cur)
    return pieces


def line_plot(series: list, title: str = "", xlabel: str = "", ylabel: str = "", xlim=None, ylim=None,
              size=(640, 400), note: str = "", legend: str = "upper right") -> Image.Image:
    """Curves with axes, ticks and a legend ('upper|center|lower left|center|right'). series: dicts {x, y, label,
    color (default: the next of COLORS), width, dash, bars (y: heights over x[i]..x[i+1])}; cut at ylim."""
    s = 2  # supersampling
    series = [dict(d, color=d.get("color") or COLORS[k % len(COLORS)]) for k, d in enumerate(series)]
    texts = [text_size(title, 16)[0]] + [text_size(line, 11)[0] for line in note.split("\n") if note]
    size = (max(size[0], 90 + max(texts)), size[1])  # wide enough for the title and the note
    w, h = size[0] * s, size[1] * s
    img = Image.new("RGB", (w, h), WHITE)
    draw = ImageDraw.Draw(img)
    xs = np.concatenate([np.asarray(d["x"], float) for d in series])
    ys = np.concatenate([np.asarray(d["y"], float) for d in series])
    xlim = xlim or (float(xs.min()), float(xs.max()))
    ylim = ylim or (float(min(0, ys.min())), float(ys.max()) * 1.05)
    yticks, xticks = nice_ticks(*ylim), nice_ticks(*xlim)
    head = (text_block([title], 16) if title else 0) + (text_block(note.split("\n"), 11) if note else 0)
    left = (10 + text_size("M", 13)[1] + 8 + max(text_size(f"{t:g}", 12)[0] for t in yticks) + 10) * s
    top, right = (12 + head + 10) * s, w - 16 * s
    bottom = h - (10 + 2 * text_size("M", 13)[1] + 14) * s
    draw_title(img, left, 12 * s, title, note, (16, 11), s)

    def px(x, yv):
        return (left + (x - xlim[0]) / (xlim[1] - xlim[0]) * (right - left),
                bottom - (yv - ylim[0]) / (ylim[1] - ylim[0]) * (bottom - top))

    for t in yticks:  # grid, ticks, labels
        yy = px(xlim[0], t)[1]
        draw.line([(left, yy), (right, yy)], fill=(232, 232, 232), width=s)
        draw_text(img, (left - 8 * s, yy), f"{t:g}", 12 * s, GREY, anchor="rm")
    for t in xticks:
        xx = px(t, ylim[0])[0]
        draw.line([(xx, bottom), (xx, bottom + 5 * s)], fill=GREY, width=s)
        draw_text(img, (xx, bottom + 7 * s), f"{t:g}", 12 * s, GREY, anchor="mt")
    for d in series:
        color = d["color"]
        x, yv = np.asarray(d["x"], float), np.asarray(d["y"], float)
        if d.get("bars"):
            for i in range(len(yv)):
                (x0, y0), (x1, _) = px(x[i], min(yv[i], ylim[1])), px(x[i + 1], ylim[0])
                draw.rectangle([x0 + s, y0, x1 - s, bottom], fill=color)
            continue
        for piece in clip_polyline(list(zip(x, yv)), *ylim):
            pts = [px(*p) for p in piece]
            if d.get("dash"):
                dashed(draw, pts, color, d.get("width", 2) * s, 9 * s, 6 * s)
            else:
                draw.line(pts, fill=color, width=d.get("width", 2) * s, joint="curve")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK, width=s)  # axes
    draw_text(img, ((left + right) // 2, h - 8 * s), xlabel, 13 * s, anchor="mb")
    draw_text(img, (10 * s, (top + bottom) // 2), ylabel, 13 * s, anchor="lm", rotate=90)
    draw_legend(img, [d for d in series if d.get("label")], (left, top, right, bottom), legend, s)
    return img.resize(size, Image.LANCZOS)


def dashed(draw, pts, color, width, on, off):
    """A dashed polyline: `on` pixels drawn, `off` left out, along its length."""
    phase = 0.0
    for (xa, ya), (xb, yb) in zip(pts[:-1], pts[1:]):
        length = math.hypot(xb - xa, yb - ya)
        pos = 0.0
        while pos < length:
            seg = (on - phase) if phase < on else (on + off - phase)
            end = min(length, pos + seg)
            if phase < on:
                a, b = pos / length, end / length
                draw.line([(xa + a * (xb - xa), ya + a * (yb - ya)), (xa + b * (xb - xa), ya + b * (yb - ya))],
                          fill=color, width=width)
            phase = (phase + end - pos) % (on + off)
            pos = end


def draw_legend(img, shown, box, where, s):
    """The labelled series' samples and labels in a framed box inside the axes `box` (at `where`)."""
    if not shown:
        return
    draw = ImageDraw.Draw(img)
    pad, sample, line_h = 8 * s, 26 * s, text_size("M", 12)[1] * s + 4 * s
    width = pad * 3 + sample + max(text_size(d["label"], 12)[0] for d in shown) * s
    height = pad * 2 + line_h * len(shown)
    left, top, right, bottom = box
    x = right - width - 8 * s if "right" in where else ((left + right - width) // 2 if "center" in where.split()[-1]
                                                         else left + 8 * s)
    y = top + 6 * s if "upper" in where else (bottom - height - 8 * s if "lower" in where
                                               else (top + bottom - height) // 2)
    draw.rectangle([x, y, x + width, y + height], fill=WHITE, outline=(200, 200, 200), width=s)
    for i, d in enumerate(shown):
        color, yy = d["color"], y + pad + i * line_h + line_h // 2
        if d.get("bars"):
            draw.rectangle([x + pad, yy - 5 * s, x + pad + sample, yy + 5 * s], fill=color)
        elif d.get("dash"):
            dashed(draw, [(x + pad, yy), (x + pad + sample, yy)], color, d.get("width", 2) * s, 7 * s, 4 * s)
        else:
            draw.line([(x + pad, yy), (x + pad + sample, yy)], fill=color, width=d.get("width", 2) * s)
        draw_text(img, (x + pad * 2 + sample, yy), d["label"], 12 * s, anchor="lm")


def grid_layout(widths: list, heights: list, row_labels: list, col_labels: list, title: str = "",
                subtitle: str = "", notes: bool = False, gap: int = 8) -> dict:
    """Where `image_grid` (gap between pictures) and `heatmap` (gap 0) draw: {'size', 'boxes': [[(x0, y0, x1, y1)]]
    (row, column), 'row_label_x'}."""
    m = 12
    label_w = max([0] + [text_size(r, 13)[0] for r in row_labels])
    head = (text_block([title], 17) if title else 0) + (text_block(subtitle.split("\n"), 12) if subtitle else 0)
    top = m + head + (6 if head else 0) + (text_size("T", 13)[1] + 6 if col_labels else 0)
    note_h = text_size("0", 12)[1] + 2 if notes else 0
    x0 = m + (label_w + 8 if label_w else 0)
    xs = [x0 + sum(widths[:j]) + gap * j for j in range(len(widths))]
    ys = [top + sum(heights[:i]) + (gap + note_h) * i for i in range(len(heights))]
    boxes = [[(x, y, x + wj, y + hi) for x, wj in zip(xs, widths)] for y, hi in zip(ys, heights)]
    width = max(xs[-1] + widths[-1] + m if widths else 2 * m, m + text_size(title, 17)[0] + m if title else 0,
                *[m + text_size(s, 12)[0] + m for s in subtitle.split("\n") if subtitle],
                *[x + (wj + text_size(c, 13)[0]) // 2 + m for x, wj, c in zip(xs, widths, col_labels)])
    height = (ys[-1] + heights[-1] + note_h if heights else top) + m
    return dict(size=(width, height), boxes=boxes, row_label_x=m + label_w)


def as_rgb(a) -> np.ndarray:
    a = np.asarray(a)
    return np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a


def image_grid(cells: list, row_labels: list, col_labels: list, title: str = "", subtitle: str = "",
               notes: list | None = None, with_layout: bool = False):
    """Pictures (uint8 [h, w(, 3)] or None: 'n/a') in labelled rows and columns, notes[i][j] under each (or None).
    → Image (with_layout: and grid_layout)."""
    n_cols = max(len(r) for r in cells)
    widths = [max([as_rgb(r[j]).shape[1] for r in cells if j < len(r) and r[j] is not None] or [64])
              for j in range(n_cols)]
    heights = [max([as_rgb(c).shape[0] for c in r if c is not None] or [64]) for r in cells]
    lay = grid_layout(widths, heights, row_labels, col_labels, title, subtitle, notes is not None)
    img = Image.new("RGB", lay["size"], WHITE)
    draw_frame(img, lay, title, subtitle, row_labels, col_labels)
    for i, row in enumerate(cells):
        for j in range(n_cols):
            x0, y0, x1, y1 = lay["boxes"][i][j]
            c = row[j] if j < len(row) else None
            if c is None:
                ImageDraw.Draw(img).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(220, 220, 220))
                draw_text(img, ((x0 + x1) // 2, (y0 + y1) // 2), "n/a", 12, GREY, anchor="mm")
            else:
                img.paste(Image.fromarray(as_rgb(c)), (x0, y0))
            if notes and notes[i][j]:
                draw_text(img, ((x0 + x1) // 2, y1 + 1), notes[i][j], 12, GREY, anchor="mt")
    return (img, lay) if with_layout else img


def vstack(images: list, gap: int = 16, across: bool = False) -> Image.Image:
    """Pictures one above the other, left edges aligned (across: side by side, bottoms aligned), on white."""
    widths, heights, span = [i.width for i in images], [i.height for i in images], gap * (len(images) - 1)
    size = (sum(widths) + span, max(heights)) if across else (max(widths), sum(heights) + span)
    out, pos = Image.new("RGB", size, WHITE), 0
    for im in images:
        out.paste(im, (pos, size[1] - im.height) if across else (0, pos))
        pos += (im.width if across else im.height) + gap
    return out


def upscale(a, k: int) -> np.ndarray:
    return np.asarray(a).repeat(k, 0).repeat(k, 1)


def small_png(img: Image.Image, path, colors: int = 256):
    """A PNG of at most `colors` colours (a few tens of KB for these figures)."""
    img.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
