"""The shared helpers: atomic writes, the dtype table, the YAML loader, error lines and error kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rs_detect.config import load_config
from rs_detect.dtypes import model_input_dtype, pixel_torch_dtype, torch_dtype
from rs_detect.engines import metadata
from rs_detect.errors import ConfigError, ModelError, error_line, one_line
from rs_detect.fsutil import atomic_path, atomic_write_bytes, atomic_write_text, load_yaml_mapping


def test_atomic_path_renames_on_success_and_keeps_the_target_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.geojson"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and tmp.suffix == ".geojson"
        assert not tmp.exists()  # drivers create the file themselves
        tmp.write_text("new")
        Path(f"{tmp}-journal").write_text("sqlite")  # a companion that only a failure must clean up
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    Path(f"{tmp}-journal").unlink()
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        Path(f"{tmp}-wal").write_text("wal")
        raise RuntimeError("boom")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.geojson"]


def test_atomic_writes_create_parents_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "a" / "x.json", "{}")
    assert atomic_write_text(tmp_path / "a" / "x.json", "{}", parents=True).read_text() == "{}"
    assert atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01", fsync=True).read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.bin", "x.json"]


def test_dtype_table() -> None:
    assert torch_dtype(np.uint16) is torch.uint16 and torch_dtype("float16") is torch.float16
    assert torch_dtype(np.dtype(np.float64)) is torch.float64  # exact, no widening
    with pytest.raises(TypeError, match="complex64"):
        torch_dtype(np.complex64)
    # raw pixels keep their integer dtype on the way to the device; other dtypes are staged as float32
    assert [pixel_torch_dtype(t) for t in (np.uint8, np.int16, np.uint16, np.float32)] == [torch.uint8, torch.int16, torch.uint16, torch.float32]
    assert [pixel_torch_dtype(t) for t in (np.float64, np.float16, np.uint32)] == [torch.float32] * 3
    assert model_input_dtype("tensor(float16)") == np.float16 and model_input_dtype("tensor(float)") == np.float32
    assert model_input_dtype("float16") == np.float16 and model_input_dtype(np.float64) == np.float32


def test_yaml_loader_names_the_file_and_the_problem(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("a: 1\n")
    assert load_yaml_mapping(good, "config file", {"a", "b"}, ConfigError) == {"a": 1}
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml_mapping(tmp_path / "empty.yaml", "config file", {"a"}, ConfigError) == {}
    cases = {"missing.yaml": None, "list.yaml": "- 1\n- 2\n", "bad.yaml": "a: [1,\n", "typo.yaml": "c: 1\n"}
    expected = {"missing.yaml": "config file not found", "list.yaml": "must be a mapping", "bad.yaml": "not valid YAML",
                "typo.yaml": "unknown key 'c' (allowed: a, b)"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as err:
            load_yaml_mapping(tmp_path / name, "config file", {"a", "b"}, ConfigError)
        assert str(err.value).startswith(f"{tmp_path / name}: ") and expected[name] in str(err.value)
        assert "\n" not in str(err.value)


def test_error_line_is_one_line_naming_the_file() -> None:
    exc = ModelError("m.onnx: not a loadable ONNX model (line one\n   line two)")
    assert error_line(exc) == "error: m.onnx: not a loadable ONNX model (line one line two)"
    assert one_line(ValueError("a\n b  c"), 3) == "a b" and one_line(KeyError()) == "KeyError"


def test_an_out_of_range_setting_is_a_config_error_wherever_it_is_written(tmp_path: Path) -> None:
    """``conf: 1.5`` in a config file, a flag or a model YAML is the same mistake: a ConfigError."""
    model = tmp_path / "m.onnx"
    (tmp_path / "cfg.yaml").write_text("conf: 1.5\n")
    (tmp_path / "m.yaml").write_text("conf: 1.5\n")
    with pytest.raises(ConfigError, match="conf must be in"):
        load_config(tmp_path / "cfg.yaml")
    with pytest.raises(ConfigError, match="conf must be in"):
        load_config(None, conf=1.5)
    with pytest.raises(ConfigError, match=r"m\.onnx: conf must be in \[0, 1\], got 1.5"):
        metadata.resolve(model, {}, None)  # the sidecar m.yaml
    with pytest.raises(ConfigError, match="batch bounds"):
        metadata.resolve(model, {}, {"batch": {"min": 4, "max": 2}})
    # the same value carried inside the model file is the model's fault
    with pytest.raises(ModelError, match="conf must be in") as err:
        metadata.resolve(tmp_path / "other.onnx", {"conf": "1.5"}, None)
    assert not isinstance(err.value, ConfigError)
