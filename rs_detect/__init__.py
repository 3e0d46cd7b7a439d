"""rs-detect: find planes and ships in huge remote-sensing scenes.

The settings of a run: :mod:`rs_detect.plan` (one resolved ``RunPlan``). Stages (one module each), in
the order only :mod:`rs_detect.executor` knows, which also owns every thread of a run:

    io.reader.RasterSource -> io.tiling windows -> io.prefetch batches -> preprocess -> engines.*
    -> postprocess.decode -> postprocess.nms -> postprocess.stitch -> georef -> io.writer
"""

__version__ = "0.1.0"

DOTA_CLASSES: tuple[str, ...] = (
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
    "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
    "roundabout", "soccer-ball-field", "swimming-pool",
)
