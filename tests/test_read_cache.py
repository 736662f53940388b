"""Reading many adapters of one model: a tensor table checked once is not checked again, and nothing else is skipped.

Files of the tasks of one model differ only in their metadata, which safetensors writes first; ``read_adapter`` keeps
the tables it checked and, for a header that is new metadata followed by a known table, parses and checks the
metadata alone. Every file here is read twice, with the tables forgotten and with them known: the outcome (the
adapter, or the error and its message) must be the same.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest
import torch

import clr_timm
from clr_timm import adapter as adapter_module

from ._models import make_model

PREFIX = b'{"__metadata__":'


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The adapter file of a test_resnet with 3 classes, trained away from the identity."""
    model = clr_timm.attach(make_model("test_resnet", num_classes=3))
    with torch.no_grad():
        for t in clr_timm.adapter_state_dict(model).values():
            if t.is_floating_point():
                t.add_(0.01)
    path = tmp_path_factory.mktemp("cache") / "pets.safetensors"
    clr_timm.save_adapter(model, path, task="pets", label_names=["a", "b", "c"])
    return path


def _parts(path: Path) -> tuple[bytes, bytes, bytes]:
    """(metadata JSON, the header after it and its comma, data section) of a file safetensors wrote."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8 : 8 + n], raw[8 + n :]
    assert header.startswith(PREFIX)
    cut = header.index(b'},"', len(PREFIX)) + 1  # metadata values are JSON-escaped: no '},"' inside them
    return header[len(PREFIX) : cut], header[cut + 1 :], data


def _file(path: Path, metadata: bytes, rest: bytes, data: bytes) -> Path:
    header = PREFIX + metadata + b"," + rest
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _outcome(path: Path, *, known: bool, source: Path) -> tuple:
    adapter_module._CHECKED_TABLES.clear()
    adapter_module._RUNS.clear()
    if known:
        clr_timm.read_adapter(source)  # the table of the source file is now known
        assert adapter_module._CHECKED_TABLES
    try:
        a = clr_timm.read_adapter(path)
    except clr_timm.AdapterError as e:
        return ("error", str(e))
    return ("read", a.metadata, a.task, {k: (t.dtype, t.shape, t.tolist()) for k, t in a.tensors.items()})


def test_a_known_table_is_not_checked_again(saved, monkeypatch):
    adapter_module._CHECKED_TABLES.clear()
    adapter_module._RUNS.clear()
    first = clr_timm.read_adapter(saved)
    calls = []
    checked = adapter_module._entry
    monkeypatch.setattr(adapter_module, "_entry", lambda *a: calls.append(a) or checked(*a))
    again = clr_timm.read_adapter(saved)
    assert calls == []
    assert again.metadata == first.metadata
    assert all(torch.equal(again.tensors[k], t) for k, t in first.tensors.items())


@pytest.mark.parametrize(
    "metadata",
    [
        b'{"task":"\\"a\\"","task":"\\"b\\""}',  # a key twice
        b"[]",
        b'"x"',
        b"{}",
        b'{"clr_format":1}',
        b'{"a":{"b":"c"}}',
        b'{"a":"b"},"bn1.x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}',  # smuggles a tensor in
        b'{"a":"b"',
        b"{ }  ",
    ],
)
def test_new_metadata_before_a_known_table_is_checked_as_in_any_file(saved, tmp_path, metadata):
    _, rest, data = _parts(saved)
    path = _file(tmp_path / "odd.safetensors", metadata, rest, data)
    assert _outcome(path, known=True, source=saved) == _outcome(path, known=False, source=saved)


def test_other_metadata_before_a_known_table_reads_as_without_it(saved, tmp_path):
    metadata, rest, data = _parts(saved)
    other = metadata.replace(b'"task":"\\"pets\\""', b'"task":"\\"birds\\""')
    assert other != metadata
    path = _file(tmp_path / "birds.safetensors", other, rest, data)
    outcome = _outcome(path, known=True, source=saved)
    assert outcome[0] == "read" and outcome[2] == "birds"
    assert outcome == _outcome(path, known=False, source=saved)


@pytest.mark.parametrize("change", ["nan", "shorter", "longer", "bool-like"])
def test_a_known_table_over_other_data_is_checked_as_in_any_file(saved, tmp_path, change):
    metadata, rest, data = _parts(saved)
    if change == "nan":
        data = bytearray(data)
        data[-4:] = struct.pack("<f", float("nan"))
        data = bytes(data)
    elif change == "shorter":
        data = data[:-4]
    elif change == "longer":
        data = data + b"\0\0\0\0"
    else:
        rest = rest.replace(b'"F32"', b'"BOOL"', 1)
    path = _file(tmp_path / "odd.safetensors", metadata, rest, data)
    outcome = _outcome(path, known=True, source=saved)
    assert outcome[0] == "error"
    assert outcome == _outcome(path, known=False, source=saved)


def test_a_model_loads_from_a_file_read_with_a_known_table(saved, tmp_path):
    adapter_module._CHECKED_TABLES.clear()
    adapter_module._RUNS.clear()
    clr_timm.read_adapter(saved)
    model = make_model("test_resnet", num_classes=3)
    clr_timm.load_adapter(copy.deepcopy(model), saved)
    loaded = clr_timm.load_adapter(model, saved)
    adapter = clr_timm.read_adapter(saved)
    state = clr_timm.adapter_state_dict(loaded)
    assert all(torch.equal(state[k], t) for k, t in adapter.tensors.items())
