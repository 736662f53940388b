"""Hostile adapter files: refused early, at a cost bounded by what the file really holds, with short messages.

Reading is measured by the bytes the process reads (``rchar`` in ``/proc/self/io``), so each test can tell "refused
after the header" from "read whole, then refused"; where it matters the same measure is shown to catch the old way of
reading (the whole file) on the same file.
"""

from __future__ import annotations

import copy
import json
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save_file

import clr_timm
from clr_timm import adapter as adapter_module
from clr_timm.adapter import (
    MAX_HEADER_BYTES,
    MAX_METADATA_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    MAX_RANK,
    MAX_TENSORS,
)

from ._models import assert_state_equal, make_model, state_copy
from .test_fuzz import _with_header

MODEL = "test_resnet"
KB = 1024
MB = 2**20
# What may be read beyond the header: /proc/self/io itself, and the odd page of a file Python opens.
SLACK = 64 * KB


def _bytes_read() -> int:
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])
    except OSError:
        pytest.skip("needs /proc/self/io (Linux) to count the bytes read")


def _read_cost(fn, *args, **kwargs) -> tuple[int, BaseException | None]:
    """Bytes read while ``fn`` ran, and what it raised."""
    before = _bytes_read()
    try:
        fn(*args, **kwargs)
    except Exception as e:
        return _bytes_read() - before, e
    return _bytes_read() - before, None


def _raw(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file from a header (a dict, or its bytes as they are) and a data section."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A test_resnet (3 classes) and a file of its adapter, trained away from the identity."""
    model = make_model(MODEL, num_classes=3)
    trained = clr_timm.attach(copy.deepcopy(model))
    with torch.no_grad():
        for t in clr_timm.adapter_state_dict(trained).values():
            if t.is_floating_point():
                t.add_(0.01)
    path = tmp_path_factory.mktemp("hostile") / "pets.safetensors"
    clr_timm.save_adapter(trained, path, task="pets", label_names=["a", "b", "c"])
    return model, path


def _fresh(saved) -> torch.nn.Module:
    return copy.deepcopy(saved[0])


# ------------------------------------------------------------------------------------------------ bounded reading


def test_a_gigabyte_of_zeros_is_refused_after_reading_a_few_bytes(tmp_path, saved):
    zeros = tmp_path / "zeros.safetensors"
    with open(zeros, "wb") as f:
        f.truncate(2**30)  # sparse: a gigabyte on paper, nothing on disk
    for read in (clr_timm.read_adapter, lambda p: clr_timm.load_adapter(_fresh(saved), p)):
        cost, error = _read_cost(read, zeros)
        assert isinstance(error, clr_timm.AdapterError)
        assert cost < SLACK, f"read {cost} bytes of a file of zeros before refusing it"


def test_the_byte_counter_sees_a_file_read_whole(tmp_path):
    """The measure the tests above rely on, shown on the old way of reading (the whole file, then safetensors)."""
    zeros = tmp_path / "zeros.safetensors"
    with open(zeros, "wb") as f:
        f.truncate(32 * MB)
    cost, error = _read_cost(lambda p: load(Path(p).read_bytes()), zeros)
    assert error is not None and cost >= 32 * MB


def test_a_header_length_that_does_not_fit_the_file_is_refused_before_reading_it(tmp_path, saved):
    _, path = saved
    data = path.read_bytes()
    for claimed in (len(data), 2**40, 2**64 - 1):
        bad = tmp_path / f"long-{claimed}.safetensors"
        bad.write_bytes(struct.pack("<Q", claimed) + data[8:])
        cost, error = _read_cost(clr_timm.read_adapter, bad)
        assert isinstance(error, clr_timm.AdapterError) and "announces a header" in str(error)
        assert cost < SLACK


def test_a_header_larger_than_the_bound_is_refused_unread(tmp_path):
    # 1.4 million empty tensors: a 90 MB header (this took 25 s and 2.2 GB before it was refused).
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(1_400_000))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(_raw(("{" + entries + "}").encode()))
    del entries
    start = time.perf_counter()
    cost, error = _read_cost(clr_timm.read_adapter, huge)
    assert isinstance(error, clr_timm.AdapterError) and str(MAX_HEADER_BYTES) in str(error)
    assert cost < SLACK and time.perf_counter() - start < 0.5


def test_more_tensors_than_the_bound_are_refused_by_count(tmp_path):
    n = MAX_TENSORS + 100
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
    many = tmp_path / "many.safetensors"
    many.write_bytes(_raw(header))
    assert many.stat().st_size < MAX_HEADER_BYTES
    tracemalloc.start()
    try:
        cost, error = _read_cost(clr_timm.read_adapter, many)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(error, clr_timm.AdapterError) and str(MAX_TENSORS) in str(error)
    assert cost < many.stat().st_size + SLACK
    # Counting the header's structure costs a few copies of it and an object per string, all bounded; no dict of
    # 16,484 entries is built.
    assert peak < 3 * many.stat().st_size + 8 * MB, f"{peak} bytes of objects for a {many.stat().st_size}-byte header"


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"x": "a" * (24 * MB)}, str(MAX_HEADER_BYTES)),  # 24 MB of metadata cost +684 MB before
        ({"x": "a" * (MAX_METADATA_VALUE_CHARS + 1)}, str(MAX_METADATA_VALUE_CHARS)),
        ({f"k{i}": "a" * (MB + 1000) for i in range(4)}, str(MAX_METADATA_CHARS)),
        ({f"k{i}": "" for i in range(MAX_METADATA_KEYS + 1)}, str(MAX_METADATA_KEYS)),
    ],
    ids=["24MB", "one-value", "total", "keys"],
)
def test_metadata_beyond_its_bounds_is_refused(tmp_path, meta, message):
    bad = tmp_path / "meta.safetensors"
    bad.write_bytes(_raw({"__metadata__": {"clr_format": "clr_timm.adapter", **meta}}))
    cost, error = _read_cost(clr_timm.read_adapter, bad)
    assert isinstance(error, clr_timm.AdapterError) and message in str(error)
    assert cost < min(bad.stat().st_size, MAX_HEADER_BYTES) + SLACK


@pytest.mark.parametrize(
    "structure",
    ["[" + ",".join(["[]"] * 2_000_000) + "]", "[" * 100_000 + "]" * 100_000, "[" + ",".join(["0"] * 3_000_000) + "]"],
    ids=["many-arrays", "deep", "long-array"],
)
def test_a_header_whose_json_no_adapter_has_is_refused_before_it_is_parsed(tmp_path, structure):
    bad = tmp_path / "structure.safetensors"
    bad.write_bytes(_raw(f'{{"__metadata__":{{}},"x":{structure}}}'.encode()))
    assert bad.stat().st_size < MAX_HEADER_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(clr_timm.AdapterError, match=r"JSON objects and arrays|not valid JSON"):
            clr_timm.read_adapter(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # json.loads would build 2 million lists (~140 MB) from the first; refused, it costs three copies of the text.
    assert peak < 3 * bad.stat().st_size + MB


def _first_tensor(header: dict) -> dict:
    return header[min(k for k in header if k != "__metadata__")]


def _edit_entry(what, value):
    def edit(header):
        if what == "metadata":
            header["__metadata__"]["task"] = value
        else:
            _first_tensor(header)[what] = value

    return edit


@pytest.mark.parametrize(
    "what, value, message",
    [
        ("dtype", "F8_E4M3", "dtype 'F8_E4M3'"),
        ("dtype", "C64", "dtype 'C64'"),
        ("dtype", "U16", "dtype 'U16'"),
        ("dtype", None, "dtype None"),
        ("shape", [-1, 2], "shape"),
        ("shape", [1] * (MAX_RANK + 1), "shape"),
        ("shape", [2.0], "shape"),
        ("shape", [True], "shape"),
        ("shape", [2**40, 2**40], "shape"),
        ("data_offsets", [0, 2**62], "bytes 0 to"),
        ("data_offsets", [8, 4], "bytes 8 to 4"),
        ("data_offsets", [0], "not [begin, end]"),
        ("data_offsets", [0, 4], "takes 4 bytes"),
        ("metadata", 5, "metadata must map strings to strings"),
    ],
)
def test_every_header_entry_is_checked_before_any_tensor_is_read(tmp_path, saved, what, value, message):
    _, path = saved
    bad = tmp_path / "entry.safetensors"
    bad.write_bytes(_with_header(path.read_bytes(), _edit_entry(what, value)))
    (n,) = struct.unpack("<Q", bad.read_bytes()[:8])
    cost, error = _read_cost(clr_timm.read_adapter, bad)
    assert isinstance(error, clr_timm.AdapterError), error
    assert message in str(error)
    assert cost < 8 + n + SLACK, "tensor data was read before the header was refused"


def test_overlapping_or_gapped_offsets_and_duplicate_keys_are_refused(tmp_path, saved):
    _, path = saved
    header, data = _split(path.read_bytes())
    names = sorted(k for k in header if k != "__metadata__")
    overlap = copy.deepcopy(header)
    overlap[names[1]] = overlap[names[0]]  # two tensors on the same bytes
    text = json.dumps(header, separators=(",", ":"))
    first = json.dumps({names[0]: header[names[0]]}, separators=(",", ":"))[1:-1]
    for name, content in [
        ("overlap", _raw(overlap, data)),
        ("trailing", _raw(header, data + b"\0" * 8)),
        ("duplicate", _raw(("{" + first + "," + text[1:]).encode(), data)),
        ("not-utf8", _raw(b'{"\xff":1}', data)),
    ]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(clr_timm.AdapterError, match="not a readable safetensors file"):
            clr_timm.read_adapter(bad)


def test_with_a_model_a_tensor_it_has_no_place_for_is_refused_by_name_unread(tmp_path, saved):
    _, path = saved
    tensors = load_file(str(path))
    tensors["junk.weight"] = torch.zeros(8 * MB)  # 32 MB the model has no place for
    bad = tmp_path / "junk.safetensors"
    save_file(tensors, str(bad), metadata=clr_timm.read_adapter(path).metadata)
    fresh = _fresh(saved)
    before = state_copy(fresh)
    cost, error = _read_cost(clr_timm.load_adapter, fresh, bad)
    assert isinstance(error, clr_timm.AdapterMismatchError) and "'junk.weight'" in str(error)
    assert cost < 2 * MB, f"read {cost} bytes to refuse a tensor by its name"
    assert not clr_timm.is_attached(fresh)
    assert_state_equal(before, state_copy(fresh))
    # The same file read without a model is read whole (it is the file's content), which the counter sees.
    cost, error = _read_cost(clr_timm.read_adapter, bad)
    assert error is None and cost >= 32 * MB


@pytest.mark.parametrize("dtype", [None, "fp16", "bf16"])
def test_a_valid_file_reads_as_safetensors_reads_it(tmp_path, saved, dtype):
    model, _ = saved
    attached = clr_timm.attach(copy.deepcopy(model))
    path = clr_timm.save_adapter(attached, tmp_path / "a.safetensors", dtype=dtype, task="t")
    mine, theirs = clr_timm.read_adapter(path), load_file(str(path))
    assert set(mine.tensors) == set(theirs)
    for k, v in theirs.items():
        assert mine.tensors[k].dtype == v.dtype and torch.equal(mine.tensors[k], v), k
    assert clr_timm.is_attached(clr_timm.load_adapter(copy.deepcopy(model), path))


# --------------------------------------------------------------------------------- nested or wrongly typed metadata


@pytest.mark.parametrize(
    "key, value",
    [
        ("config", "[" * 100_000 + "]" * 100_000),
        ("config", '{"include": ' + "[" * 900 + "]" * 900 + "}"),
        ("config", '{"include": {"layer1.*": 1}}'),
        ("config", '{"exclude": 5}'),
        ("config", '{"kernel_size": "3"}'),
        ("config", '{"kernel_size": 1' + "0" * 5000 + "}"),
        ("config", '{"depthwise": ["clr"]}'),
        ("config", '{"train_head": null}'),
        ("config", "[]"),
        ("config", "null"),
        ("label_names", "[" * 100_000 + "]" * 100_000),
        ("label_names", '[["a"], "b", "c"]'),
        ("label_names", '{"a": 1}'),
        ("num_classes", "[3]"),
        ("num_classes", "3.0"),
        ("num_classes", "1" * 5000),
        ("task", '["pets"]'),
        ("task", '"' + "\\u0000" + '"'),
        ("versions", "[" * 100_000 + "]" * 100_000),
    ],
)
def test_nested_or_wrongly_typed_metadata_raises_adapter_error(tmp_path, saved, key, value):
    _, path = saved
    meta = {**clr_timm.read_adapter(path).metadata, key: value}
    bad = tmp_path / "meta.safetensors"
    save_file(load_file(str(path)), str(bad), metadata=meta)
    fresh = _fresh(saved)
    with pytest.raises(clr_timm.AdapterError) as caught:
        clr_timm.read_adapter(bad)
    assert len(str(caught.value)) < 1000
    with pytest.raises(clr_timm.AdapterError):
        clr_timm.load_adapter(fresh, bad)
    assert not clr_timm.is_attached(fresh)


def test_versions_that_are_not_strings_are_dropped(tmp_path, saved):
    _, path = saved
    versions = {"torch": "2.0", "timm": {"nested": ["x"]}, "clr_timm": 3}
    bad = tmp_path / "versions.safetensors"
    save_file(
        load_file(str(path)),
        str(bad),
        metadata={**clr_timm.read_adapter(path).metadata, "versions": json.dumps(versions)},
    )
    assert clr_timm.read_adapter(bad).versions == {"torch": "2.0"}


# ---------------------------------------------------------------------------------------- bounded error messages

LONG = "x" * 100_000


@pytest.mark.parametrize(
    "hostile",
    ["task", "clr_format", "architecture", "fingerprint", "tensor_key", "depthwise", "kernel_size", "dtype", "pattern"],
)
def test_messages_quote_hostile_values_briefly(tmp_path, saved, hostile, monkeypatch):
    _, path = saved
    meta = dict(clr_timm.read_adapter(path).metadata)
    config = json.loads(meta["config"])
    tensors = load_file(str(path))
    raw = None
    if hostile == "task":
        meta["task"] = json.dumps(LONG[:3000])  # a name of 3,000 characters: short enough to be parsed
    elif hostile == "clr_format":
        meta["clr_format"] = LONG
    elif hostile == "architecture":
        meta["architecture"] = LONG
    elif hostile == "fingerprint":
        meta["backbone_fingerprint"] = LONG
    elif hostile == "tensor_key":
        tensors[LONG] = torch.zeros(1)
    elif hostile in ("depthwise", "kernel_size"):
        config[hostile] = LONG
    elif hostile == "pattern":
        config["exclude"] = [LONG]
    elif hostile == "dtype":
        raw = _with_header(path.read_bytes(), lambda h: _first_tensor(h).update(dtype=LONG))
    meta["config"] = json.dumps(config)
    bad = tmp_path / "long.safetensors"
    if raw is None:
        save_file(tensors, str(bad), metadata=meta)
    else:
        bad.write_bytes(raw)

    def message() -> str:
        with pytest.raises(clr_timm.CLRError) as caught:
            clr_timm.load_adapter(_fresh(saved), bad)
        return str(caught.value)

    assert len(message()) < 1000
    if hostile in ("task", "architecture", "tensor_key"):
        # The same checks quoting values whole (the weakened copy): the message carries the whole hostile value.
        monkeypatch.setattr(adapter_module, "shown", lambda value, limit=0: repr(value))
        assert len(message()) > 3000


def test_paths_the_system_cannot_take_are_clr_errors(tmp_path):
    model = clr_timm.attach(make_model("test_resnet", num_classes=3))
    for source in ["x" * 300, str(tmp_path / ("y" * 300)), "nul\x00name"]:
        with pytest.raises(clr_timm.AdapterError, match="no adapter file"):
            clr_timm.load_adapter(model, source)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    for path in [tmp_path / ("z" * 300 + ".safetensors"), blocked / "x.safetensors"]:
        with pytest.raises(clr_timm.AdapterError, match="cannot write"):
            clr_timm.save_adapter(model, path)
