"""The explore stages' HTML pages (audit, map): self-contained (images inlined as data URIs, inline CSS and SVG, no script, no network).

Thumbnails are the dataset's own images, found under the root the exported file records, scaled
down and inlined as JPEG; an image that is no longer there shows as a labelled grey box.
"""

from __future__ import annotations

import base64
import html
import io
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #dde;padding-bottom:.2em}
.sub{color:#667;margin-top:0}.lead{background:#f3f7fc;border-left:4px solid #3b7dd8;padding:.6em 1em;margin:1em 0}
.warn{background:#fdf3ec;border-left:4px solid #d8703b;padding:.6em 1em;margin:1em 0}
table{border-collapse:collapse;font-size:.86em;width:100%}th,td{padding:.3em .55em;border-bottom:1px solid #e4e6eb;text-align:left;vertical-align:top}
th{background:#f6f7f9}td.n{text-align:right;font-variant-numeric:tabular-nums}
.thumbs{display:flex;flex-wrap:wrap;gap:.4em}.thumb{font-size:.75em;color:#556;max-width:110px;word-break:break-all}
.thumb img{display:block;width:96px;height:96px;object-fit:contain;background:#f3f3f5;border:1px solid #ddd}
.missing{display:flex;align-items:center;justify-content:center;width:96px;height:96px;background:#e6e6ea;color:#778;font-size:.8em}
.tag{display:inline-block;padding:0 .35em;border-radius:3px;background:#eef;font-size:.8em}.tag.bad{background:#fbe3e3;color:#a12}
code{background:#f3f3f5;padding:0 .25em;border-radius:3px}footer{margin-top:2em;color:#889;font-size:.8em}
"""

THUMB_PX = 96


def image_root(meta: dict[str, Any]) -> Path | None:
    """The folder an exported file's paths are relative to (a manifest's folder, or the dataset folder)."""
    root = (meta.get("dataset") or {}).get("root")
    if not root:
        return None
    root = Path(root)
    return root.parent if root.suffix.lower() == ".csv" else root


@lru_cache(maxsize=4096)
def thumbnail(path: str, size: int = THUMB_PX) -> str | None:
    """A data URI of the image scaled to fit ``size`` px (JPEG, quality 80), or None when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.draft("RGB", (size * 2, size * 2))  # JPEGs decode at a reduced scale
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
    except (OSError, ValueError, SyntaxError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure(root: Path | None, path: str, caption: str) -> str:
    """One thumbnail with its path and a caption; a grey box when the image is missing."""
    e = html.escape
    uri = thumbnail(str(root / path)) if root is not None else None
    picture = f'<img src="{uri}" alt="{e(path)}">' if uri else '<span class="missing">not found</span>'
    return f'<div class="thumb">{picture}{e(path)}<br>{e(caption)}</div>'


def page(title: str, subtitle: str, body: list[str], footer: str, *, css: str = "") -> str:
    """The page around ``body`` (already HTML): the shared CSS plus the page's own ``css``."""
    e = html.escape
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}{css}</style></head><body>",
        f"<h1>{e(title)}</h1>", f'<p class="sub">{e(subtitle)}</p>', *body,
        f"<footer>{footer}</footer></body></html>",
    ]) + "\n"


def audit_page(result: Any, *, thumbnails: int = 64) -> str:
    """The audit as one page: what was found and what to do first, then each finding with its images."""
    e = html.escape
    meta = result.meta
    root = image_root(meta)
    near = result.nearest_similarity
    body = ['<ul class="lead">' + "".join(f"<li>{e(line)}</li>" for line in summary_lines(result)) + "</ul>"]
    if result.chained():
        body.append(f'<p class="warn">One duplicate group holds {result.chained()} of the {result.rows} images: at cosine '
                    f"{result.threshold:g} this backbone joins distinct images (half of them have a neighbour at "
                    f"{near['median']:.3f} or more), so the duplicate groups below are not trustworthy. Raise --threshold "
                    "(and --leakage-threshold) towards the 99% similarity, or audit a backbone that tells these images apart.</p>")
    body.append("<h2>Leakage: the same image in more than one split</h2>")
    body.append(_groups(result.leakage, root, thumbnails, "None found.", "Remove each group's copies from all but one "
                        "split (keep it in train), then re-extract and refit: the test numbers were inflated by them."))
    body.append("<h2>Duplicate groups</h2>")
    body.append(_groups(result.duplicates, root, thumbnails, "None found.", "Keep one image of each group; a group whose "
                        "labels disagree also needs its label checked."))
    body.append("<h2>Likely label errors</h2>")
    if "label_issues" in result.skipped:
        body.append(f"<p>Not checked: {e(result.skipped['label_issues'])}</p>")
    elif not result.label_issues:
        body.append("<p>None found.</p>")
    else:
        body.append("<p>Ranked by cleanlab's label quality score (out-of-fold logreg probabilities); look at the images "
                    "and fix the label where it is wrong.</p>")
        rows = [(figure(root, i.path, ""), e(i.split), e(i.given), e(i.suggested), f"{i.quality:.3f}",
                 f"{i.given_probability:.2f}", f"{i.suggested_probability:.2f}") for i in result.label_issues[:thumbnails]]
        body.append(_table(("image", "split", "given", "suggested", "quality", "p(given)", "p(suggested)"), rows))
    body.append("<h2>Outliers</h2>")
    if "outliers" in result.skipped:
        body.append(f"<p>Not checked: {e(result.skipped['outliers'])}</p>")
    else:
        body.append("<p>Farthest from their nearest neighbours (cleanlab's out-of-distribution score; low is atypical): "
                    "corrupt files, wrong domain, or rare cases worth more examples.</p>")
        body.append('<div class="thumbs">' + "".join(figure(root, o.path, f"{o.label} · score {o.score:.3f}")
                                                      for o in result.outliers[:thumbnails]) + "</div>")
    subtitle = (f"{result.rows} images, {meta.get('backbone', '')} embeddings; duplicates at cosine >= {result.threshold:g} "
                f"(across splits >= {result.leakage_threshold:g}); "
                f"nearest-neighbour similarity 1% / median / 99%: {near['p1']:.3f} / {near['median']:.3f} / {near['p99']:.3f}")
    return page(f"embedpipe audit: {Path(result.source).name}", subtitle, body,
                "Written by <code>embedpipe audit</code>; every finding is in audit.json.")


def summary_lines(result: Any) -> list[str]:
    """The audit in sentences, the most urgent first (also what the CLI prints)."""
    lines = []
    if result.leakage:
        rows = sum(len(g.rows) for g in result.leakage)
        lines.append(f"Leakage: {len(result.leakage)} duplicate groups ({rows} images) span splits; fix these first.")
    else:
        lines.append("No duplicates across splits.")
    exact = sum(g.exact for g in result.duplicates)
    lines.append(f"{len(result.duplicates)} duplicate groups ({sum(len(g.rows) for g in result.duplicates)} images; "
                 f"{exact} of identical files, {result.exact_duplicates} repeated files).")
    if "label_issues" not in result.skipped:
        lines.append(f"{len(result.label_issues)} likely label errors.")
    if "outliers" not in result.skipped:
        lines.append(f"{len(result.outliers)} outliers listed.")
    lines += [f"Skipped {check.replace('_', ' ')}: {why}" for check, why in result.skipped.items()]
    return lines


def _groups(groups: list[Any], root: Path | None, limit: int, empty: str, advice: str) -> str:
    e = html.escape
    if not groups:
        return f"<p>{e(empty)}</p>"
    rows = []
    for g in groups[:limit]:
        tags = "".join(f'<span class="tag{" bad" if bad else ""}">{e(t)}</span> ' for t, bad, on in
                       (("leakage", True, g.leakage), ("identical files", False, g.exact), ("labels differ", True, g.label_conflict)) if on)
        pictures = '<div class="thumbs">' + "".join(figure(root, p, f"{s or 'no split'} · {lab}") for p, s, lab in
                                                    zip(g.paths[:8], g.splits, g.labels)) + "</div>"
        more = f" (+{len(g.rows) - 8} more in audit.json)" if len(g.rows) > 8 else ""
        rows.append((pictures + e(more), str(len(g.rows)), f"{g.min_similarity:.3f}", tags))
    shown = f" The first {limit} of {len(groups)} are shown." if len(groups) > limit else ""
    return f"<p>{e(advice + shown)}</p>" + _table(("images", "rows", "min. similarity", ""), rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A table whose cells are already HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if c[:1].isdigit() else ""}>{c}</td>' for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# The map's plot area in CSS pixels, and the margin kept free around the points inside it.
MAP_WIDTH, MAP_HEIGHT, MAP_PAD = 1000, 660, 14
MAP_CSS = """
.map{position:relative;margin:1em 0 2.5em 3em;background:#fbfbfd}.map svg{position:absolute;left:0;top:0;overflow:visible}
.pt{position:absolute;width:9px;height:9px;margin:-4px 0 0 -4px}.pt i{display:block;width:100%;height:100%;opacity:.75}
.pt i.train,.pt i.none{border-radius:50%}.pt i.test{clip-path:polygon(50% 0,100% 100%,0 100%)}
.pt:hover{z-index:10}.pt:hover i{opacity:1;outline:2px solid #1d2430}
.tip{display:none;position:absolute;left:14px;top:-8px;background:#fff;border:1px solid #99a;border-radius:4px;padding:4px;
font-size:.75em;width:max-content;max-width:240px;word-break:break-all;box-shadow:0 2px 8px rgba(0,0,0,.2)}
.pt.l .tip{left:auto;right:14px}.pt.u .tip{top:auto;bottom:-8px}.pt:hover .tip{display:block}
.tip img{display:block;margin-bottom:3px}.legend{display:flex;flex-wrap:wrap;gap:.3em 1.2em;font-size:.85em;margin:.5em 0}
.legend span.k{display:inline-block;width:10px;height:10px;margin-right:.35em;vertical-align:-1px}
"""


def map_page(result: Any, *, colours: dict[str, str], axes: tuple[str, str], thumb_px: int) -> str:
    """The map as one page: points placed over an SVG frame, each showing its image and path on hover (CSS only)."""
    e = html.escape
    xy = result.coordinates
    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.maximum(high - low, 1e-12)
    # One scale for both axes (distances mean the same across and down), the points centred.
    scale = min((MAP_WIDTH - 2 * MAP_PAD) / span[0], (MAP_HEIGHT - 2 * MAP_PAD) / span[1])
    offset = (np.array([MAP_WIDTH, MAP_HEIGHT]) - scale * span) / 2
    px = offset[0] + scale * (xy[:, 0] - low[0])
    py = MAP_HEIGHT - (offset[1] + scale * (xy[:, 1] - low[1]))  # up is up
    root = image_root(result.meta)
    with_image = set(result.thumbnails)
    points, inlined = [], 0
    for row, (path, label, split) in enumerate(zip(result.paths, result.labels, result.splits)):
        x, y = float(px[row]), float(py[row])
        where = ("l " if x > MAP_WIDTH / 2 else "") + ("u" if y > MAP_HEIGHT / 2 else "")
        words = f"{label or '(unlabelled)'} · {split or 'no split'}"
        marker = f'<i class="{e(split or "none")}" style="background:{colours[label]}"></i>'
        uri = thumbnail(str(root / path), thumb_px) if root is not None and row in with_image else None
        if uri:
            inlined += 1
            tip = f'<span class="tip"><img src="{uri}" alt="{e(path)}">{e(path)}<br>{e(words)}</span>'
            points.append(f'<span class="pt {where}" style="left:{x:.1f}px;top:{y:.1f}px">{marker}{tip}</span>')
        else:
            points.append(f'<span class="pt {where}" style="left:{x:.1f}px;top:{y:.1f}px" title="{e(path)} · {e(words)}">{marker}</span>')
    frame = (f'<svg width="{MAP_WIDTH}" height="{MAP_HEIGHT}" viewBox="0 0 {MAP_WIDTH} {MAP_HEIGHT}" role="img" aria-label="{e(axes[0])} against {e(axes[1])}">'
             f'<rect x="0" y="0" width="{MAP_WIDTH}" height="{MAP_HEIGHT}" fill="none" stroke="#ccd"/>')
    if low[0] < 0 < high[0]:
        zero = offset[0] - scale * low[0]
        frame += f'<line x1="{zero:.1f}" y1="0" x2="{zero:.1f}" y2="{MAP_HEIGHT}" stroke="#dde" stroke-dasharray="4 4"/>'
    if low[1] < 0 < high[1]:
        zero = MAP_HEIGHT - (offset[1] - scale * low[1])
        frame += f'<line x1="0" y1="{zero:.1f}" x2="{MAP_WIDTH}" y2="{zero:.1f}" stroke="#dde" stroke-dasharray="4 4"/>'
    frame += (f'<text x="{MAP_WIDTH / 2}" y="{MAP_HEIGHT + 20}" text-anchor="middle" font-size="13" fill="#556">{e(axes[0])}</text>'
              f'<text x="-12" y="{MAP_HEIGHT / 2}" text-anchor="middle" font-size="13" fill="#556" '
              f'transform="rotate(-90 -12 {MAP_HEIGHT / 2})">{e(axes[1])}</text></svg>')
    counts: dict[str, int] = {}
    for label in result.labels:
        counts[label] = counts.get(label, 0) + 1
    shapes = {"train": "border-radius:50%", "val": "", "test": "clip-path:polygon(50% 0,100% 100%,0 100%)"}
    legend = "".join(f'<span><span class="k" style="background:{c}"></span>{e(n or "(unlabelled)")} ({counts[n]})</span>'
                     for n, c in colours.items())
    legend += "".join(f'<span><span class="k" style="background:#889;{shapes[s]}"></span>{s}</span>'
                      for s in ("train", "val", "test") if s in result.splits)
    body = [(f'<p class="lead">Each point is an image; hover over one to see it{"" if inlined else " (no thumbnails: set --thumbnails)"}. '
             "Colour: its class; shape: its split (circle train, square val, triangle test). Points close together "
             "have similar embeddings.</p>"),
            f'<div class="legend">{legend}</div>',
            f'<div class="map" style="width:{MAP_WIDTH}px;height:{MAP_HEIGHT}px">{frame}{"".join(points)}</div>']
    how = ("PCA of the L2-normalised embeddings" if result.method == "pca" else "UMAP (cosine) of the embeddings")
    shown = f"{inlined} of {len(result.paths)} points show their image on hover ({thumb_px} px), the rest their path"
    subtitle = f"{len(result.paths)} images, {result.meta.get('backbone', '')} embeddings; {how}; {shown}."
    return page(f"embedpipe map: {Path(result.source).name}", subtitle, body,
                "Written by <code>embedpipe map</code>; coordinates in map.csv, the same picture in map.png.", css=MAP_CSS)
