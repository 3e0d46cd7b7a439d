"""The run summary (``_run_summary.json`` and the table printed at the end) and the merged index."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rs_detect import __version__
from rs_detect.batch.manifest import _atomic_write_text
from rs_detect.batch.worker import SceneOutcome, Status, one_line_error
from rs_detect.errors import OutputError
from rs_detect.io.writer import format_for

if TYPE_CHECKING:
    import geopandas as gpd

SUMMARY_NAME = "_run_summary.json"
INDEX_FORMATS = ("gpkg", "parquet")


@dataclass
class BatchSummary:
    """Every scene of the run once (keyed by its relative path), with totals and the merged index."""

    outdir: Path
    mode: str = "serial"
    workers: int = 1
    model: str = ""
    model_sha256: str = ""
    config_sha256: str = ""
    started: str = ""
    seconds: float = 0.0
    outcomes: dict[str, SceneOutcome] = field(default_factory=dict)
    index: dict[str, Any] | None = None
    interrupted: bool = False
    gpus: list[str] = field(default_factory=list)  # one local worker pinned to each (empty: none pinned)

    def add(self, outcome: SceneOutcome) -> None:
        """Record a scene; a second report for the same scene (a retried task) replaces the first."""
        self.outcomes[outcome.scene] = outcome

    def by_status(self, status: Status) -> list[SceneOutcome]:
        return [o for k, o in sorted(self.outcomes.items()) if o.status == status]

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(o.status for o in self.outcomes.values())
        return {s: c.get(s, 0) for s in ("done", "skipped", "failed")}

    @property
    def failed(self) -> bool:
        return self.counts["failed"] > 0

    def per_class(self, statuses: Iterable[Status] = ("done", "skipped")) -> dict[str, int]:
        total: Counter[str] = Counter()
        wanted = set(statuses)
        for o in self.outcomes.values():
            if o.status in wanted:
                total.update(o.per_class)
        return dict(sorted(total.items()))

    @property
    def tiles_done(self) -> int:
        """Tiles run through the engine in this run (skipped scenes excluded)."""
        return sum(o.tiles_read for o in self.by_status("done"))

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def scenes_per_s(self) -> float:
        return self.counts["done"] / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "software": f"rs-detect {__version__}",
            "outdir": str(self.outdir),
            "mode": self.mode,
            "workers": self.workers,
            "gpus": self.gpus,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "config_sha256": self.config_sha256,
            "started": self.started,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "counts": self.counts,
            "per_class": self.per_class(),
            "per_class_this_run": self.per_class(("done",)),
            "tiles": self.tiles_done,
            "tiles_per_s": round(self.tiles_per_s, 3),
            "scenes_per_s": round(self.scenes_per_s, 4),
            "index": self.index,
            "scenes": [o.to_dict() for _, o in sorted(self.outcomes.items())],
        }

    def write(self, path: Path | None = None) -> Path:
        path = path or self.outdir / SUMMARY_NAME
        _atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=str))
        return path

    def table(self) -> str:
        """The human summary printed at the end of ``rs-detect batch``."""
        rows = [("", "scenes", "tiles", "detections", "seconds")]
        for status in ("done", "skipped", "failed"):
            items = self.by_status(status)  # type: ignore[arg-type]
            if status == "failed":
                rows.append((status, str(len(items)), "-", "-", "-"))
                continue
            rows.append((
                status, str(len(items)), str(sum(o.tiles_read for o in items)), str(sum(o.detections for o in items)),
                f"{sum(o.seconds for o in items):.1f}" if status == "done" else "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        per = ", ".join(f"{k} {v}" for k, v in self.per_class().items()) or "none"
        lines.append(f"detections per class (done + skipped): {per}")
        lines.append(
            f"{self.tiles_done} tiles in {self.seconds:.1f} s: {self.tiles_per_s:.1f} tiles/s, "
            f"{self.scenes_per_s:.2f} scenes/s ({self.mode}, {self.workers} worker{'s' if self.workers != 1 else ''})"
        )
        if self.gpus:
            per_gpu = Counter(o.gpu for o in self.by_status("done") if o.gpu is not None)
            lines.append("scenes per GPU: " + ", ".join(f"{g} {per_gpu.get(g, 0)}" for g in self.gpus))
        if self.index:
            lines.append(f"index: {self.index.get('path')} ({self.index.get('features')} detections, {self.index.get('crs_name')})")
            for note in self.index.get("notes", []):
                lines.append(f"  note: {note}")
        warned = [(o.scene, w) for o in self.outcomes.values() if o.status == "done" for w in o.warnings]
        if warned:
            lines.append("warnings:")
            lines.extend(f"  {scene}: {w}" for scene, w in sorted(warned))
        failed = self.by_status("failed")
        if failed:
            lines.append("failed:")
            lines.extend(f"  {o.scene}: {o.error}" for o in failed)
        if self.interrupted:
            lines.append("interrupted: rerun the same command to finish the remaining scenes")
        return "\n".join(lines)



def read_detections(path: Path) -> gpd.GeoDataFrame:
    """A per-scene output back as a GeoDataFrame (any of the writer's formats)."""
    import geopandas as gpd

    from rs_detect.io.writer import LAYER

    fmt = format_for(path)
    if fmt == "parquet":
        return gpd.read_parquet(path)
    return gpd.read_file(path, engine="pyogrio", layer=LAYER)


def write_index(summary: BatchSummary, path: Path, crs_mode: str) -> dict[str, Any]:
    """Merge the finished scenes' outputs into one GeoPackage/GeoParquet with a ``scene`` column.

    CRS rule: ``--crs wgs84`` gives WGS84. ``--crs native`` keeps the scenes' CRS when they all share
    one, else reprojects every scene to WGS84 (and says so in ``notes``). Scenes without a CRS (pixel
    coordinates) cannot share a map with the others and are left out, listed in ``excluded``.
    Written atomically, after all scenes.
    """
    import geopandas as gpd
    import pandas as pd
    from pyproj import CRS as ProjCRS

    from rs_detect.io.writer import write_detections

    frames: list[tuple[str, gpd.GeoDataFrame]] = []
    excluded: list[str] = []
    notes: list[str] = []
    for o in summary.by_status("done") + summary.by_status("skipped"):
        if o.output is None:
            continue
        if o.crs is None:
            excluded.append(o.scene)
            continue
        gdf = read_detections(Path(o.output))
        gdf = gdf.set_crs(ProjCRS.from_wkt(o.crs), allow_override=True)  # the manifest's CRS is the truth
        gdf["scene"] = o.scene
        frames.append((o.scene, gdf))
    frames.sort(key=lambda t: t[0])
    if excluded:
        notes.append(f"{len(excluded)} scene(s) without a CRS (pixel coordinates) left out: {', '.join(sorted(excluded))}")
    wgs84 = ProjCRS.from_epsg(4326)
    crss = {f.crs.to_wkt() for _, f in frames}
    if crs_mode == "native" and len(crss) == 1:
        target = frames[0][1].crs
    else:
        target = wgs84
        if crs_mode == "native" and len(crss) > 1:
            notes.append(f"scenes have {len(crss)} different CRSs: the index is reprojected to WGS84")
    parts = []
    for scene, gdf in frames:
        if not gdf.crs.equals(target):
            try:
                gdf = gdf.to_crs(target)
            except Exception as exc:  # noqa: BLE001 - pyproj raises several types
                excluded.append(scene)
                notes.append(f"{scene}: cannot reproject to {target.name} ({one_line_error(exc)[:120]}): left out")
                continue
        parts.append(gdf)
    if parts:
        merged = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), geometry="geometry", crs=target)
    else:
        merged = gpd.GeoDataFrame({"scene": pd.array([], dtype="str")}, geometry=gpd.GeoSeries([], crs=target), crs=target)
    meta = {"software": f"rs-detect {__version__}", "scenes": len(parts), "excluded": sorted(excluded),
            "model_sha256": summary.model_sha256, "config_sha256": summary.config_sha256}
    write_detections(merged, path, meta)
    return {"path": str(path), "features": len(merged), "scenes": len(parts), "crs_name": target.name,
            "excluded": sorted(excluded), "notes": notes}


def check_index_format(path: Path) -> None:
    """Refuse an index that is not a GeoPackage or GeoParquet, before any scene is run."""
    if format_for(path) not in INDEX_FORMATS:
        raise OutputError(f"{path}: the merged index must be a GeoPackage (.gpkg) or GeoParquet (.parquet)")

