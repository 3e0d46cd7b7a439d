"""Which scenes a batch run has and where each one's output goes (mirroring the input tree)."""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from rs_detect.errors import ConfigError, InputError
from rs_detect.io.location import RemoteScene, is_remote, scene_path
from rs_detect.io.writer import EXTENSIONS

DEFAULT_PATTERNS: tuple[str, ...] = ("*.tif", "*.tiff")
MANIFEST_SUFFIX = ".done.json"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    low = name.lower()
    return any(fnmatch(low, p.lower()) for p in patterns)


def _walk(folder: Path, patterns: Sequence[str], exclude: Sequence[Path]) -> Iterator[Path]:
    """Files below ``folder`` whose name matches a pattern; hidden folders and ``exclude`` are pruned."""
    excluded = {os.path.abspath(e) for e in exclude}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.abspath(os.path.join(dirpath, d)) not in excluded
        )
        for name in sorted(filenames):
            if not name.startswith(".") and _matches(name, patterns):
                yield Path(os.path.abspath(os.path.join(dirpath, name)))


def discover_scenes(
    inputs: Sequence[str | os.PathLike[str]],
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    exclude: Sequence[Path] = (),
) -> tuple[list[Path], Path]:
    """Scenes named by ``inputs`` (files, folders searched recursively with ``patterns``, or globs).

    Returns the absolute scene paths (sorted, each once) and their common root, the folder that
    outputs are mirrored from. A file named explicitly is taken whatever its name; patterns match
    case-insensitively. A missing input or an empty result is an :class:`InputError`.

    An input that GDAL opens by name (``/vsicurl/...``, ``http(s)://``, ``/vsis3/...``, ``s3://``) is one
    remote scene, kept as written (a :class:`~rs_detect.io.location.RemoteScene`); remote folders are
    not listed. Local scenes alone decide the root.
    """
    patterns = tuple(patterns) or DEFAULT_PATTERNS
    found: dict[str, Path] = {}
    roots: list[str] = []

    def add(path: Path) -> None:
        found.setdefault(str(path), path)

    for raw in inputs:
        if is_remote(raw):
            remote = scene_path(raw)
            found.setdefault(str(remote), remote)  # type: ignore[arg-type]
            continue
        path = Path(os.path.abspath(os.path.expanduser(os.fspath(raw))))
        if path.is_file():
            add(path)
        elif path.is_dir():
            roots.append(str(path))
            for f in _walk(path, patterns, exclude):
                add(f)
        elif glob.has_magic(os.fspath(raw)):
            matches = sorted(glob.glob(os.path.expanduser(os.fspath(raw)), recursive=True))
            if not matches:
                raise InputError(f"{raw}: no file matches this pattern")
            for m in matches:
                mp = Path(os.path.abspath(m))
                if mp.is_dir():
                    roots.append(str(mp))
                    for f in _walk(mp, patterns, exclude):
                        add(f)
                elif mp.is_file():
                    add(mp)
        else:
            raise InputError(f"{raw}: no such file or directory")
    if not found:
        raise InputError(f"no scenes found in {', '.join(map(str, inputs))} (patterns {', '.join(patterns)})")
    scenes = sorted(found.values(), key=str)
    local = [str(s.parent) for s in scenes if not isinstance(s, RemoteScene)]
    root = Path(os.path.commonpath(roots + local)) if roots or local else Path(os.path.abspath("."))
    return scenes, root


@dataclass(frozen=True)
class SceneJob:
    """One scene of the archive and where its output goes."""

    scene: Path  # absolute path of the input (or a RemoteScene: a URL or /vsi path as written)
    rel: str  # path relative to the run's common root, POSIX separators: the scene's id in the run
    output: Path  # absolute path of the per-scene output

    @property
    def manifest(self) -> Path:
        return manifest_path(self.output)


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + MANIFEST_SUFFIX)


def remote_rel(scene: RemoteScene) -> Path:
    """Where a remote scene's output goes below OUTDIR: ``<host>/<path of the URL>`` (``:`` of a port as ``_``)."""
    parts = [p for p in scene.url_path.split("/") if p not in ("", ".", "..")] or [scene.name]
    host = scene.host.replace(":", "_")
    return Path(host, *parts) if host else Path(*parts)


def plan_jobs(scenes: Sequence[Path], root: Path, outdir: Path, fmt: str = "geojson") -> list[SceneJob]:
    """Map each scene to ``outdir/<path below root>.<ext>``.

    Two scenes that would share an output (``x.tif`` and ``x.tiff`` side by side; names that differ only
    in case) keep their full file name instead: ``x.tif.geojson`` and ``x.tiff.geojson``.
    """
    if fmt not in EXTENSIONS:
        raise ConfigError(f"unknown output format {fmt!r} (use {', '.join(EXTENSIONS)})")
    ext = EXTENSIONS[fmt]
    outdir = Path(os.path.abspath(outdir))
    rels = [remote_rel(s) if isinstance(s, RemoteScene) else Path(os.path.relpath(s, root)) for s in scenes]
    counts = Counter(str(r.with_suffix(ext)).lower() for r in rels)
    jobs = []
    for scene, rel in zip(scenes, rels):
        target = rel.with_suffix(ext) if counts[str(rel.with_suffix(ext)).lower()] == 1 else rel.with_name(rel.name + ext)
        jobs.append(SceneJob(scene=scene, rel=rel.as_posix(), output=outdir / target))
    return jobs

