"""Quick-look PNG of a scene with its detections: what an analyst glances at before trusting a run.

The picture comes from one decimated read of the scene (``RasterSource.read_preview``: rasterio's
``out_shape`` read, which GDAL serves from overviews when the file has them), scaled with the same
scene-wide stretch the detection used, so what looks dark here also looked dark to the model.
Detections are drawn from their scene-pixel boxes (rotated rectangles for OBB) as outlines in one
colour per class (the colours of the QGIS style, :func:`rs_detect.style.class_colours`). A title bar
names the scene; a footer holds the legend with counts per class and, when the CRS is projected, a
scale bar. Pillow does the drawing: fast, and no plotting stack needed.

    render_preview(scene_or_source, detections, names, out_path)   # any scene + Detections
    render_result_preview(result, out_path=None)                    # a pipeline SceneResult
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from affine import Affine
from PIL import Image, ImageDraw, ImageFont
from rasterio.crs import CRS

from rs_detect.errors import OutputError, RsDetectError
from rs_detect.io.reader import RasterSource
from rs_detect.types import ScaleConfig
from rs_detect.style import class_colours
from rs_detect.types import Detections

if TYPE_CHECKING:
    from rs_detect.pipeline import SceneResult

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]

BACKGROUND: RGB = (28, 28, 30)  # title bar, footer and any margin around a narrow scene
TEXT: RGB = (240, 240, 240)
SCALE_BAR: RGB = (255, 255, 255)
MIN_MARKER = 6  # boxes smaller than this (preview px) are drawn as a square of this size
DEFAULT_MAX_SIZE = 2048
DEFAULT_MIN_SIZE = 512
MIN_CANVAS_WIDTH = 360


@dataclass(frozen=True)
class PreviewLayout:
    """Where things ended up in the picture (for callers that report it, and for tests).

    ``zoom`` is preview pixels per scene pixel (x, y): scene pixel ``(x, y)`` is drawn at
    ``(image_box[0] + x * zoom[0], image_box[1] + y * zoom[1])``.
    """

    path: Path
    size: tuple[int, int]
    image_box: Box
    zoom: tuple[float, float]
    legend_box: Box
    swatches: dict[str, Box]
    counts: dict[str, int]
    scale_bar: Box | None
    scale_bar_label: str | None
    seconds: float


def default_preview_path(output: Path) -> Path:
    """``<output stem>.preview.png`` beside ``output`` (the detections file, or the scene)."""
    return output.with_name(f"{output.stem}.preview.png")


# -- reading -------------------------------------------------------------------------------------------


def _source_args_from_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Band plan and the exact stretch of a run, from the metadata the pipeline writes."""
    bands = tuple(int(b) for b in metadata.get("bands") or ()) or None
    combine = metadata.get("band_combine", "direct")
    channels = 1 if combine in ("luminance", "palette") else 3 if combine == "replicate" else len(bands or (1,))
    scale = metadata.get("scale") or {}
    cfg = ScaleConfig()
    if "low" in scale and "high" in scale and float(scale["high"]) > float(scale["low"]):
        cfg = ScaleConfig(method="fixed", low=float(scale["low"]), high=float(scale["high"]))
    return {"channels": channels, "bands": bands, "scale": cfg}


def _to_rgb(arr: np.ndarray) -> Image.Image:
    """Scaled [C, h, w] in [0, 1] -> an RGB image (one channel as grey, three as colour)."""
    data = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    img = (np.clip(data, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if img.shape[0] >= 3:
        return Image.fromarray(np.ascontiguousarray(img[:3].transpose(1, 2, 0)), mode="RGB")
    return Image.fromarray(img[0], mode="L").convert("RGB")


# -- drawing -------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _corners(dets: Detections) -> np.ndarray:
    from rs_detect.georef import pixel_corners

    return pixel_corners(dets) if len(dets) else np.zeros((0, 4, 2))


def draw_detections(img: Image.Image, dets: Detections, colours: Sequence[RGB], zoom: tuple[float, float], width: int) -> None:
    """Outline every detection on ``img`` (the scene at ``zoom``), most confident last (on top)."""
    if not len(dets):
        return
    pts = _corners(dets) * np.asarray(zoom)  # [K, 4, 2] preview pixels
    order = np.argsort(dets.scores.detach().cpu().numpy(), kind="stable")
    class_ids = dets.class_ids.cpu().numpy()
    draw = ImageDraw.Draw(img)
    for k in order:
        colour = colours[int(class_ids[k])]
        poly = pts[k]
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        if (hi - lo).max() < MIN_MARKER:  # too small to see at this zoom: a marker of fixed size
            cx, cy = (lo + hi) / 2
            r = MIN_MARKER / 2
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), outline=colour, width=width)
        else:
            draw.polygon([(float(x), float(y)) for x, y in poly], outline=colour, width=width)


def nice_length(max_metres: float) -> float:
    """The longest 1, 2 or 5 x 10^k metres not above ``max_metres``."""
    if max_metres <= 0 or not math.isfinite(max_metres):
        return 0.0
    exp = math.floor(math.log10(max_metres))
    for m in (5, 2, 1):
        if m * 10**exp <= max_metres:
            return float(m * 10**exp)
    return float(10 ** (exp - 1) * 5)


def metres_per_pixel(crs: CRS | None, transform: Affine) -> float | None:
    """Ground size of one scene pixel along x, or None where the CRS is not projected."""
    if crs is None or not crs.is_projected:
        return None
    try:
        factor = float(crs.linear_units_factor[1])
    except Exception:  # a projected CRS without a linear unit rasterio can name
        factor = 1.0
    size = math.hypot(transform.a, transform.d) * factor
    return size if size > 0 and math.isfinite(size) else None


def _format_metres(m: float) -> str:
    return f"{m / 1000:g} km" if m >= 1000 else f"{m:g} m"


@dataclass(frozen=True)
class _Footer:
    legend: Box
    swatches: dict[str, Box]
    scale_bar: Box | None
    label: str | None


def _layout_legend(entries: list[tuple[str, str, RGB]], font: Any, x0: int, y0: int, x_max: int, pad: int) -> tuple[list[tuple[int, int, str, str, RGB]], int]:
    """Flow legend entries (swatch + text) into rows that fit before ``x_max``; returns items and bottom."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + pad // 2
    x, y = x0, y0
    items = []
    for key, text, colour in entries:
        w = line_h + pad // 2 + int(probe.textlength(text, font=font)) + pad * 2
        if x > x0 and x + w > x_max:
            x, y = x0, y + line_h + pad // 2
        items.append((x, y, key, text, colour))
        x += w
    return items, y + line_h


def _draw_footer(canvas: Image.Image, top: int, counts: dict[str, int], colours: dict[str, RGB],
                 mpp_preview: float | None, image_box: Box, font: Any, pad: int) -> _Footer:
    draw = ImageDraw.Draw(canvas)
    width = canvas.width
    bar_space = width // 3 if mpp_preview else 0
    entries = [(name, f"{name}  {n}", colours[name]) for name, n in counts.items()] or [("", "no detections", TEXT)]
    items, bottom = _layout_legend(entries, font, pad, top + pad, width - bar_space - pad, pad)
    swatches: dict[str, Box] = {}
    line_h = int(draw.textbbox((0, 0), "Ag", font=font)[3])
    for x, y, key, text, colour in items:
        if key:
            sw = (x, y + 1, x + line_h, y + line_h)
            draw.rectangle(sw, fill=colour)
            swatches[key] = sw
            x += line_h + pad // 2
        draw.text((x, y), text, fill=TEXT, font=font)
    legend = (pad, top + pad, width - bar_space - pad, bottom)
    bar: Box | None = None
    label: str | None = None
    if mpp_preview:
        img_w = image_box[2] - image_box[0]
        label_w = int(draw.textlength("5000 km", font=font)) + pad
        metres = nice_length(min(bar_space - label_w - 2 * pad, img_w // 5) * mpp_preview)
        length = int(round(metres / mpp_preview)) if metres else 0
        if length >= 8:
            label = _format_metres(metres)
            x1 = width - pad
            x0 = x1 - length
            thick = max(4, line_h // 3)
            y_mid = top + pad + line_h // 2
            draw.rectangle((x0, y_mid - thick // 2, x1, y_mid - thick // 2 + thick), fill=SCALE_BAR)
            for x in (x0, (x0 + x1) // 2, x1):  # end and middle ticks
                draw.line((x, y_mid - line_h // 2, x, y_mid + line_h // 2), fill=SCALE_BAR, width=2)
            tw = draw.textlength(label, font=font)
            draw.text((x0 - pad - tw, top + pad), label, fill=TEXT, font=font)
            bar = (x0, y_mid - line_h // 2, x1 + 1, y_mid + line_h // 2 + 1)
    return _Footer(legend, swatches, bar, label)


def _counts(dets: Detections, names: Sequence[str]) -> dict[str, int]:
    ids, n = np.unique(dets.class_ids.cpu().numpy(), return_counts=True) if len(dets) else ([], [])
    return {names[int(i)]: int(c) for i, c in zip(ids, n)}  # in class order: the same in every scene


def compose(scene_img: Image.Image, dets: Detections, names: Sequence[str], zoom: tuple[float, float],
            title: str, mpp_scene: float | None) -> tuple[Image.Image, Box, dict[str, int], _Footer]:
    """Title bar + scene with outlines + footer (legend, scale bar) as one RGB canvas."""
    w, h = scene_img.size
    long_side = max(w, h)
    fs = int(min(26, max(12, long_side / 64)))
    font = _font(fs)
    pad = max(6, fs // 2)
    line_w = max(1, round(long_side / 1024))
    colours_by_name = class_colours(list(names))
    draw_detections(scene_img, dets, [colours_by_name[n] for n in names], zoom, line_w)
    counts = _counts(dets, names)

    canvas_w = max(w, MIN_CANVAS_WIDTH)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3])
    title_h = line_h + 2 * pad
    mpp_preview = mpp_scene / zoom[0] if mpp_scene else None
    # the footer height depends on how the legend wraps: lay it out once on a scratch canvas
    scratch = Image.new("RGB", (canvas_w, 10 * (line_h + pad) + 4 * pad))
    img_box_guess = ((canvas_w - w) // 2, 0, (canvas_w - w) // 2 + w, h)
    footer_h = _draw_footer(scratch, 0, counts, colours_by_name, mpp_preview, img_box_guess, font, pad).legend[3] + pad
    canvas = Image.new("RGB", (canvas_w, title_h + h + footer_h), BACKGROUND)
    x0 = (canvas_w - w) // 2
    image_box = (x0, title_h, x0 + w, title_h + h)
    canvas.paste(scene_img, image_box[:2])
    draw = ImageDraw.Draw(canvas)
    text = title
    while len(text) > 4 and draw.textlength(text, font=font) > canvas_w - 2 * pad:  # too long: cut the end
        text = text[: len(text) - 5].rstrip() + "..."
    draw.text((pad, pad), text, fill=TEXT, font=font)
    footer = _draw_footer(canvas, title_h + h, counts, colours_by_name, mpp_preview, image_box, font, pad)
    return canvas, image_box, counts, footer


# -- the public calls ----------------------------------------------------------------------------------


def render_preview(
    source: str | os.PathLike[str] | RasterSource,
    detections: Detections,
    names: Sequence[str],
    out_path: str | os.PathLike[str],
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    min_size: int = DEFAULT_MIN_SIZE,
    title: str | None = None,
    channels: int = 1,
    bands: tuple[int, ...] | None = None,
    scale: ScaleConfig | None = None,
) -> PreviewLayout:
    """Write a quick-look PNG (or .jpg/.webp, by extension) of the scene with ``detections``.

    ``source`` is a scene path (opened with ``channels``/``bands``/``scale``, i.e. the band plan and
    stretch of the run: pass ``ScaleConfig(method="fixed", low, high)`` from the run's metadata to
    reproduce it exactly) or an open :class:`RasterSource` (used as is, not closed). ``detections``
    are in scene pixels; ``names`` are the model's class names (indexed by ``class_ids``). The long
    side of the scene image is at most ``max_size`` (never a full-resolution read); scenes smaller
    than ``min_size`` are enlarged by an integer factor so small objects stay visible. The file is
    written atomically. Raises :class:`RsDetectError` subclasses with one-line messages.
    """
    t0 = time.perf_counter()
    out = Path(out_path)
    if detections.frame != "scene":
        raise ValueError("render_preview needs detections in scene pixels (frame 'scene')")
    if len(detections) and int(detections.class_ids.max()) >= len(names):
        raise ValueError(f"class id {int(detections.class_ids.max())} has no name ({len(names)} names)")
    fmt = _image_format(out)
    check_preview_writable(out)
    with ExitStack() as stack:
        src = source if isinstance(source, RasterSource) else stack.enter_context(
            RasterSource(Path(source), channels=channels, bands=bands, scale=scale or ScaleConfig()))
        arr, _factor = _read(src, max_size)
        scene_img = _to_rgb(arr)
        sx, sy = scene_img.width / src.width, scene_img.height / src.height
        up = max(1, min_size // max(scene_img.size)) if max(src.width, src.height) < min_size else 1
        if up > 1:
            scene_img = scene_img.resize((scene_img.width * up, scene_img.height * up), Image.Resampling.NEAREST)
            sx, sy = sx * up, sy * up
        mpp = metres_per_pixel(src.crs, src.transform)
        heading = title if title is not None else _default_title(src, len(detections), 1 / sx)
        scene_name = src.name
    canvas, image_box, counts, footer = compose(scene_img, detections, names, (sx, sy), heading, mpp)
    from rs_detect.fsutil import atomic_path

    try:
        with atomic_path(out) as tmp:
            canvas.save(tmp, format=fmt, **({"compress_level": 3} if fmt == "PNG" else {}))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the preview of {scene_name} ({exc.strerror or exc})") from None
    return PreviewLayout(out, canvas.size, image_box, (sx, sy), footer.legend, footer.swatches, counts,
                         footer.scale_bar, footer.label, time.perf_counter() - t0)


def render_result_preview(result: SceneResult, out_path: Path | None = None, **kwargs: Any) -> PreviewLayout:
    """The preview of one pipeline run (the batch-friendly call: everything comes from ``result``).

    Uses the run's class names, band plan and exact stretch (the result's own, else those recorded in
    ``result.metadata``); the default path is ``<output stem>.preview.png`` beside the output (beside
    the scene when there is none).
    """
    meta = result.metadata or {}
    if result.plan is not None and result.band_plan is not None and result.scale is not None:
        names = list(result.plan.engine.classes)
        s = result.scale
        source = {"channels": result.band_plan.channels, "bands": result.band_plan.indexes,
                  "scale": ScaleConfig(method="fixed", low=s.low, high=s.high)}
    else:
        names = list(meta.get("classes") or [])
        source = _source_args_from_metadata(meta)
    if not names:
        raise ValueError("the result's metadata has no class names")
    path = out_path or default_preview_path(result.output or result.scene)
    return render_preview(result.scene, result.detections, names, path, **{**source, **kwargs})


def check_preview_writable(path: Path) -> None:
    """Fail early (before a long run) when the preview cannot be written."""
    from rs_detect.io.writer import check_writable

    _image_format(path)
    check_writable(path, "preview")


def _image_format(path: Path) -> str:
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: unknown preview format {path.suffix!r} (use .png, .jpg or .webp)")
    return fmt


def _read(src: RasterSource, max_size: int) -> tuple[np.ndarray, float]:
    from rasterio.errors import RasterioError

    try:
        return src.read_preview(max_size)
    except RasterioError as exc:
        raise RsDetectError(f"{src.path}: preview read failed ({' '.join(str(exc).split())})") from None


def _default_title(src: RasterSource, n: int, shrink: float) -> str:
    shown = f", shown at 1/{shrink:.3g}" if shrink > 1.01 else ""
    return f"{src.name}  ·  {n} detection{'s' if n != 1 else ''}  ·  {src.width} x {src.height} px{shown}"
