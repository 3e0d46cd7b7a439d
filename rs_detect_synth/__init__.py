"""Synthetic scenes and training chips for rs-detect: a lab package, kept out of the runtime package.

``rs_detect`` never imports this package except lazily in the ``rs-detect synth`` command. The
renderer lives in :mod:`rs_detect_synth.scene`; the names below are its public API, and importing
them needs only numpy and pillow (the GIS stack is imported by the functions that write files).
"""

from rs_detect_synth.scene import (
    CLASS_NAMES,
    DTYPE_LEVELS,
    LENGTH_RANGE,
    STYLES,
    SceneDtype,
    ScenePlan,
    SceneTruth,
    Style,
    TruthObject,
    default_truth_path,
    plan_scene,
    quantize,
    render_chip,
    render_window,
    tight_rect,
    truth_frame,
    window_edges,
    write_scene,
    write_truth,
)

__all__ = [
    "CLASS_NAMES", "DTYPE_LEVELS", "LENGTH_RANGE", "STYLES", "SceneDtype", "ScenePlan", "SceneTruth", "Style",
    "TruthObject", "default_truth_path", "plan_scene", "quantize", "render_chip", "render_window", "tight_rect",
    "truth_frame", "window_edges", "write_scene", "write_truth",
]
