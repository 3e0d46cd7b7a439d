"""Where a scene's time and memory go (a diagnostic, not part of the suite): wall vs CPU time of the
main thread's and the post-processing thread's calls per batch, engine-only speed, RSS at each step.

    python3 benchmarks/probe_pipeline.py stages SCENE MODEL.torchscript   # pipeline, two timed runs
    python3 benchmarks/probe_pipeline.py reader SCENE                     # the reader alone (tiles/s)

Knobs (environment): PT reader threads (14), CUT cutter threads (default: the pipeline's), PPT
decode parts per reader thread, SWITCH the GIL switch interval, REPS timed runs, DEV device (cuda).
A call's wall time far above its CPU time is time spent waiting, for the GPU or for the GIL.
Results of the H200 runs that chose the defaults: benchmarks/results/h200_f_probe_*.jsonl.
"""
import json, os, sys, threading, time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmLck", "VmPin"):
            out[k] = int(v.split()[0]) // 1024
    return out


mode, scene, model = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None
marks = {"start": rss()}
import numpy as np, torch, rasterio  # noqa
marks["imports"] = rss()
from rs_detect.config import Config
from rs_detect.engines import load_engine
from rs_detect import pipeline as P
from rs_detect import executor as X
from rs_detect import plan as RP
from rs_detect import stages as S
from rs_detect.config import cutter_threads
from rs_detect.io.reader import RasterSource
from rs_detect.io.tiling import iter_tiles
from rs_detect.io.prefetch import window_batches
marks["rs_detect"] = rss()
DEV = os.environ.get("DEV", "cuda")
THREADS = int(os.environ.get("PT", "14"))
CUT = int(os.environ.get("CUT", "0"))
from rs_detect.io import prefetch as _pf0
_pf0.PARTS_PER_THREAD = int(os.environ.get("PPT", str(_pf0.PARTS_PER_THREAD)))
if os.environ.get("SWITCH"):
    sys.setswitchinterval(float(os.environ["SWITCH"]))
if CUT:
    RP.cutter_threads = lambda n: CUT
if mode == "reader":
    torch.zeros(1, device=DEV)
    for rep in range(2):
        src = RasterSource(scene, channels=1, handles=THREADS)
        t0 = time.perf_counter(); n = 0
        with ThreadPoolExecutor(THREADS) as pool, ThreadPoolExecutor(CUT or cutter_threads(THREADS)) as cutters:
            X.measure_scale(src, pool)
            producer = X.Producer(window_batches(src, iter_tiles(src.width, src.height, 1024, 192, src.transform), pool, 16, 1024, True, 3, THREADS, cutters), 3, "rs-batches")
            try:
                for item in producer:
                    if hasattr(item, "tiles"):
                        item.data.to("cuda", non_blocking=True)
                        n += item.size
            finally:
                producer.stop()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        src.close()
        print(json.dumps({"reader": scene.name, "threads": THREADS, "cutters": CUT or cutter_threads(THREADS), "ppt": _pf0.PARTS_PER_THREAD, "switch": sys.getswitchinterval(), "tiles": n, "s": round(dt, 3), "tiles_s": round(n / dt, 1), "rss": rss()}))
    sys.exit()

engine = load_engine(model, device=DEV)
marks["engine"] = rss()
cfg = Config(batch_size=16, device=DEV, read_threads=THREADS, prefetch=int(os.environ.get("PF", "3")), classes=None, conf=0.25)
pipe = P.ScenePipeline(engine, cfg, model)
marks["pipeline(graph)"] = rss()
x = torch.rand((16, 1, 1024, 1024), device=DEV).half()
for _ in range(3):
    engine.infer(x)
torch.cuda.synchronize() if DEV == "cuda" else None
t0 = time.perf_counter()
for _ in range(100 if DEV == "cuda" else 1):
    engine.infer(x)
torch.cuda.synchronize() if DEV == "cuda" else None
ENGINE = 16 * (100 if DEV == "cuda" else 1) / (time.perf_counter() - t0)
marks["engine_only"] = rss()
try:
    marks["host_alloc"] = {k: v for k, v in torch.cuda.host_memory_stats().items() if "current" in k or "peak" in k}
except Exception as e:
    marks["host_alloc"] = str(e)

acc = defaultdict(lambda: [0, 0.0, 0.0])  # n, wall, cpu
lock = threading.Lock()


def timed(label, f):
    def g(*a, **k):
        w, c = time.perf_counter(), time.thread_time()
        try:
            return f(*a, **k)
        finally:
            dw, dc = time.perf_counter() - w, time.thread_time() - c
            with lock:
                s = acc[label]; s[0] += 1; s[1] += dw; s[2] += dc
    return g


if mode == "stages":
    S.decode = timed("post.decode", S.decode)
    S.nms_per_tile = timed("post.nms", S.nms_per_tile)
    S.to_scene = timed("post.to_scene", S.to_scene)
    X.Normalizer.upload = timed("main.upload", X.Normalizer.upload)
    engine.infer_normalized = timed("main.infer", engine.infer_normalized)
    X.SceneExecutor._postprocess = timed("post.total", X.SceneExecutor._postprocess)
    S.TileDecoder.__call__ = timed("post.decode_all", S.TileDecoder.__call__)

pipe.run(scene)
marks["warm_run"] = rss()
for rep in range(int(os.environ.get("REPS", "2"))):
    acc.clear()
    w, c = time.perf_counter(), time.thread_time()
    r = pipe.run(scene)
    dw, dc = time.perf_counter() - w, time.thread_time() - c
    st = {k: round(v, 3) for k, v in r.stats.stage_seconds.items()}
    print(json.dumps({"run": rep, "scene": scene.name, "model": model.stem, "s": round(r.stats.seconds, 3), "tiles_s": round(r.stats.tiles_read / r.stats.seconds, 1), "engine_tiles_s": round(ENGINE, 1), "ratio": round(r.stats.tiles_read / r.stats.seconds / ENGINE, 3), "threads": THREADS, "cutters": CUT or cutter_threads(THREADS), "ppt": _pf0.PARTS_PER_THREAD, "switch": sys.getswitchinterval(), "peak_rss": rss()["VmHWM"],
                      "main_wall": round(dw, 3), "main_cpu": round(dc, 3), "stages": st,
                      "calls": {k: [v[0], round(v[1] * 1e3 / max(v[0], 1), 2), round(v[2] * 1e3 / max(v[0], 1), 2)] for k, v in sorted(acc.items())}}))
marks["end"] = rss()
print(json.dumps({"rss": marks, "env": {k: os.environ.get(k) for k in ("CUDA_MODULE_LOADING",)}}))
