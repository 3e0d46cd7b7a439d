"""rs-detect: find planes and ships in huge remote-sensing scenes.

Stages (one module each), in the order only :mod:`rs_detect.pipeline` knows:

    io.reader.RasterSource -> io.tiling windows -> batches -> engines.* -> postprocess.decode
    -> postprocess.nms -> postprocess.stitch -> georef -> io.writer
"""

__version__ = "0.1.0"

DOTA_CLASSES: tuple[str, ...] = (
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
    "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
    "roundabout", "soccer-ball-field", "swimming-pool",
)
