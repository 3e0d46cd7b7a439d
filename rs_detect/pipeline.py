"""A scene pipeline in one call: resolve the run's plan, then run scenes through the executor.

    ScenePipeline(engine, config).run(scene)  ==  SceneExecutor(resolve_plan(config, engine), engine).run(scene)

The order of the stages and every thread of a run: :mod:`rs_detect.executor`. The settings in force:
:mod:`rs_detect.plan`. The stages themselves: :mod:`rs_detect.io.reader`, :mod:`rs_detect.io.prefetch`,
:mod:`rs_detect.preprocess`, :mod:`rs_detect.engines`, :mod:`rs_detect.stages`.
"""

from __future__ import annotations

from pathlib import Path

from rs_detect.config import Config
from rs_detect.engines.base import Engine
from rs_detect.executor import SceneExecutor
from rs_detect.fsutil import file_sha256
from rs_detect.plan import RunPlan, resolve_plan
from rs_detect.stages import SceneResult

__all__ = ["ScenePipeline", "SceneResult", "file_sha256"]


class ScenePipeline:
    """Runs scenes through one loaded engine (load once, run many) with the plan resolved from ``config``."""

    def __init__(self, engine: Engine, config: Config, model_path: Path | None = None, model_sha256: str | None = None) -> None:
        if model_sha256 is None and model_path and Path(model_path).is_file():
            model_sha256 = file_sha256(Path(model_path))
        self.engine, self.config, self.meta = engine, config, engine.meta
        self.model_path = model_path
        self.plan: RunPlan = resolve_plan(config, engine, model_path, model_sha256)
        self.executor = SceneExecutor(self.plan, engine)

    @property
    def tile_size(self) -> int:
        return self.plan.tiling.tile_size

    @property
    def batch_size(self) -> int:
        return self.plan.engine.batch_size

    @property
    def read_threads(self) -> int:
        return self.plan.execution.read_threads

    @property
    def prefetch(self) -> int:
        return self.plan.execution.read_ahead

    def run(self, scene: Path, output: Path | None = None, progress: bool = False) -> SceneResult:
        return self.executor.run(scene, output, progress)
