"""Malformed model metadata: every value a model file may hold ends in the project's own ModelError.

The fuzzing uses hypothesis (strings, numbers, nested lists and dicts, the issue's own examples); the
last test drives one malformed ONNX through the CLI: one ``error:`` line, exit 1, no output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import export_tiny_onnx, one_error_line, write_tif
from rs_detect.cli import cli
from rs_detect.engines.metadata import MAX_LITERAL_CHARS, from_mapping
from rs_detect.errors import ModelError

KEYS = ("names", "imgsz", "channels", "task", "batch", "stride", "conf", "conf_by_class")

#: The audit's examples: each used to escape as OverflowError, ValueError or RecursionError.
NASTY = [
    ("imgsz", "1e400"),
    ("names", "{'a':'plane'}"),
    ("channels", "'three'"),
    ("imgsz", "9" * 5000),
    ("names", "[" * 100_000 + "]" * 100_000),
    ("names", "[" * 30_000 + "]" * 30_000),  # under the length bound: the nesting bound answers
    ("names", "{0:" * 20_000 + "1" + "}" * 20_000),
    ("imgsz", "-1e400"),
    ("conf", "nan"),
    ("conf", "1e400"),
    ("batch", {"min": "1e400"}),
    ("names", "{0: 'a', 2: 'b'}"),
    ("names", "[]"),
    ("imgsz", "[]"),
    ("imgsz", 640.5),
    ("task", ["detect"]),
    ("conf_by_class", "{'plane': [1]}"),
]

CASES = {"examples": 0, "fuzzed": 0}


@pytest.mark.parametrize(("key", "value"), NASTY, ids=[f"{k}-{str(v)[:12]}" for k, v in NASTY])
def test_the_audits_values_are_one_line_model_errors(key: str, value: object) -> None:
    CASES["examples"] += 1
    with pytest.raises(ModelError) as err:
        from_mapping({key: value}, source="m.onnx")
    msg = str(err.value)
    assert msg.startswith(f"m.onnx: {key}") and msg.endswith("(in its model metadata)")
    assert "\n" not in msg and len(msg) < 300


leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["1e400", "-0", "nan", "inf", "{", "[[", "'x'", "0x10", "1_000", "()"]),
)
tree = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.one_of(st.integers(), st.text(max_size=5)), kids, max_size=4)), max_leaves=20)
value = st.one_of(tree, tree.map(repr), tree.map(lambda t: json.dumps(t, default=str)), st.text(max_size=200))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), value, max_size=4))
def test_fuzzed_metadata_raises_nothing_but_model_error(raw: dict[str, object]) -> None:
    CASES["fuzzed"] += 1
    try:
        meta = from_mapping(raw, source="m.onnx")
    except ModelError as exc:
        assert "\n" not in str(exc)
        return
    # accepted: the values are sane
    assert 1 <= meta.imgsz <= 1 << 15 and 1 <= meta.channels <= 64 and meta.names
    assert 0.0 <= meta.conf <= 1.0 if meta.conf is not None else True
    assert 1 <= meta.min_batch <= meta.opt_batch <= meta.max_batch


def test_long_values_are_refused_before_parsing() -> None:
    with pytest.raises(ModelError, match="characters long"):
        from_mapping({"names": "x" * (MAX_LITERAL_CHARS + 1)}, source="m.onnx")


def test_well_formed_metadata_still_parses() -> None:
    meta = from_mapping({"names": "{0: 'plane', 1: 'ship'}", "imgsz": "[640, 640]", "channels": "3", "stride": 32,
                         "batch": {"min": 1, "opt": 4, "max": 8}, "conf": "0.4", "task": "obb"}, source="m.onnx")
    assert meta.names == ("plane", "ship") and meta.imgsz == 640 and meta.channels == 3
    assert (meta.min_batch, meta.opt_batch, meta.max_batch) == (1, 4, 8) and meta.conf == 0.4 and meta.task == "obb"


@pytest.mark.parametrize(("key", "value"), [("imgsz", "1e400"), ("names", "[" * 30_000 + "]" * 30_000), ("channels", "'three'")])
def test_a_malformed_onnx_is_one_error_line_on_the_cli(tmp_path: Path, key: str, value: str) -> None:
    model = export_tiny_onnx(tmp_path / "bad.onnx")
    m = onnx.load(str(model))
    for p in m.metadata_props:
        if p.key == key:
            p.value = value
    onnx.save(m, str(model))
    scene = write_tif(tmp_path / "s.tif", np.zeros((64, 64), np.uint8))
    out = tmp_path / "s.geojson"
    res = CliRunner().invoke(cli, [str(scene), "--model", str(model), "-o", str(out)])
    one_error_line(res, "bad.onnx", key, outputs=(out,))


def test_zz_report_case_counts() -> None:
    """Prints how many metadata cases ran (``pytest -s`` shows it; the closing note quotes it)."""
    print(f"\nmetadata fault cases: {CASES}")
    assert CASES["examples"] in (0, len(NASTY))  # 0 when run alone with -k
