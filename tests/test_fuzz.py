"""Fuzzing the adapter loader: every mutated file either loads correctly or raises clr_timm's own error.

Hypothesis mutates a real adapter of a tiny timm model in two ways: its bytes (flips in the length field, the JSON
header and the tensor data, truncation, extension, splices, insertions, deletions, a rewritten length field, and
structured edits of the header's dtype / shape / offset entries), and its content written back through safetensors'
own ``save_file`` (metadata and config JSON values of every type, unknown keys, huge numbers, unicode, deep nesting,
and missing, extra, reshaped, retyped or non-finite tensors). For each case:

- either ``load_adapter`` succeeds, and the model then holds exactly the tensors the file holds (and, when the file's
  tensors and config are the original ones, gives the original outputs),
- or it raises :class:`clr_timm.CLRError`, and the model is bit-identical to before and not attached.

Anything else (another exception type, a half-loaded model) fails the test. Nothing may unpickle: ``pickle`` and
``torch.load`` raise for the whole run. The budget is fixed and derandomized, so CI runs the same cases every time;
each test prints how many cases ran and how they ended (``pytest -s``) and records it as a junit property.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import clr_timm

from ._models import make_input, make_model, state_copy

MODEL = "test_resnet"  # timm's own tiny test network: 377k parameters, a 35 kB adapter, 8 ms per load
NUM_CLASSES = 3
BYTE_CASES = 250
CONTENT_CASES = 250


def _budget(cases: int) -> settings:
    """A fixed, derandomized number of cases with no example database: CI runs the same cases on every run."""
    return settings(
        max_examples=cases,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Original:
    """The valid adapter every case starts from, and what loading it gives."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pristine = make_model(MODEL, num_classes=NUM_CLASSES).eval()
        trained = clr_timm.attach(copy.deepcopy(self.pristine))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # move every adapter tensor off its initial value, as training would
            for key, t in clr_timm.adapter_state_dict(trained).items():
                if key.endswith("running_var"):
                    t.mul_(1 + 0.5 * torch.rand(t.shape, generator=g))
                elif t.is_floating_point():
                    t.add_(0.05 * torch.randn(t.shape, generator=g))
        self.path = clr_timm.save_adapter(
            trained, folder / "original.safetensors", task="pets", label_names=list("abc")
        )
        # safetensors writes the metadata in hash-map order, which changes from run to run: rewrite the header in
        # one canonical order, so that a byte offset means the same field on every run.
        self.bytes = _with_header(self.path.read_bytes(), lambda header: header)
        self.path.write_bytes(self.bytes)
        self.tensors = load_file(str(self.path))
        with safe_open(str(self.path), framework="pt") as f:
            self.metadata: dict[str, str] = dict(f.metadata())
        self.config = json.loads(self.metadata["config"])
        self.x = make_input(batch=2, size=32)
        with torch.no_grad():
            self.output = trained.eval()(self.x)
        (self.header_len,) = struct.unpack("<Q", self.bytes[:8])
        self.pristine_state = state_copy(self.pristine)
        self.model = self.fresh()  # what the next case loads into: a refused load leaves it as it is, for the next
        self.case = folder / "case.safetensors"
        self.resaved = folder / "resaved.safetensors"

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.pristine)


@pytest.fixture(scope="module")
def original() -> Iterator[_Original]:
    with tempfile.TemporaryDirectory(prefix="clr_timm-fuzz-") as folder:
        yield _Original(Path(folder))


@pytest.fixture(autouse=True)
def _never_unpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the adapter loader tried to unpickle something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def _load_and_check(original: _Original, path: Path, outcomes: Counter) -> None:
    """Load ``path`` into an unattached model and check that the outcome is a correct load or a clean refusal.

    The model is the one earlier refused cases were loaded into: each refusal must leave it bit-identical to the
    pristine model, so the next case starts from it too (and refusals cannot add up to a change unnoticed).
    """
    model, before = original.model, original.pristine_state
    try:
        clr_timm.load_adapter(model, path)
    except clr_timm.CLRError as e:
        outcomes[type(e).__name__] += 1
        assert str(e), "an error without a message"
        assert not clr_timm.is_attached(model), f"refused ({e}) but left attached"
        after = model.state_dict()
        assert list(after) == list(before), f"refused ({e}) but the model's keys changed"
        for k, v in before.items():
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"refused ({e}) but {k} changed"
        return
    original.model = original.fresh()
    outcomes["loaded"] += 1
    # Loaded: the model must hold exactly what the file holds (safetensors is the oracle for what that is).
    assert clr_timm.is_attached(model)
    in_file = load_file(str(path))
    mine = clr_timm.adapter_state_dict(model)
    assert set(mine) == set(in_file)
    for k, v in in_file.items():
        assert torch.equal(mine[k], v.to(mine[k].dtype)), f"{k} was not loaded as the file holds it"
    for k, v in before.items():  # the frozen backbone never changes
        if k not in mine:
            assert torch.equal(model.state_dict()[k], v), f"loading changed the frozen tensor {k}"
    # What loads must be usable: saved again, it reads back as the same adapter.
    again = clr_timm.read_adapter(clr_timm.save_adapter(model, original.resaved, overwrite=True))
    assert set(again.tensors) == set(mine) and all(torch.equal(again.tensors[k], v) for k, v in mine.items())
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    same = config == original.config and all(
        in_file[k].dtype == v.dtype and torch.equal(in_file[k], v) for k, v in original.tensors.items()
    )
    if same:
        outcomes["loaded, as the original"] += 1
        with torch.no_grad():
            assert torch.equal(model.eval()(original.x), original.output)


def _report(name: str, outcomes: Counter, record_property: Callable[[str, object], None]) -> None:
    total = sum(v for k, v in outcomes.items() if k != "loaded, as the original")
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]))
    print(f"\n{name}: {total} cases ({summary})")
    record_property(f"{name}_cases", total)
    record_property(f"{name}_outcomes", dict(outcomes))


# ------------------------------------------------------------------------------------------------- byte mutations

_u64 = st.integers(0, 2**64 - 1)
_position = st.integers(0, 2**31)
_chunk = st.binary(min_size=1, max_size=64)
_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "f32", "", "X"]
_header_edit = st.one_of(
    st.tuples(st.just("dtype"), _position, st.sampled_from(_DTYPES)),
    st.tuples(st.just("shape"), _position, st.lists(st.integers(-2, 2**40), max_size=5)),
    st.tuples(st.just("offsets"), _position, st.lists(st.integers(-2, 2**40), max_size=3)),
    st.tuples(st.just("rename"), _position, st.text(max_size=30)),
    st.tuples(st.just("drop"), _position, st.none()),
    st.tuples(st.just("metadata"), st.just(0), st.one_of(st.none(), st.integers(), st.lists(st.text(), max_size=2))),
)
_byte_op = st.one_of(
    st.tuples(st.just("flip"), st.sampled_from(["length", "header", "data"]), _position, st.integers(1, 255)),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("extend"), _chunk),
    st.tuples(st.just("splice"), _position, _position, st.integers(1, 256)),
    st.tuples(st.just("insert"), _position, _chunk),
    st.tuples(st.just("delete"), _position, st.integers(1, 256)),
    st.tuples(st.just("length"), _u64),
    st.tuples(st.just("header"), _header_edit),
)


def _with_header(data: bytes, edit: Callable[[dict], object]) -> bytes:
    """The file with its JSON header parsed, edited in place, and written back (sorted, with the right length)."""
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        return data
    if not isinstance(header, dict):
        return data
    edit(header)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def _apply_header_edit(data: bytes, edit: tuple) -> bytes:
    """Rewrite the JSON header (still valid JSON, with the right length field) with one entry changed."""
    return _with_header(data, lambda header: _edit_header(header, edit))


def _edit_header(header: dict, edit: tuple) -> None:
    what, index, value = edit
    if what == "metadata":
        header["__metadata__"] = value
    else:
        names = sorted(k for k in header if k != "__metadata__")
        if not names:
            return
        name = names[index % len(names)]
        if what == "drop":
            del header[name]
        elif what == "rename":
            header[value] = header.pop(name)
        elif isinstance(header[name], dict):
            header[name][{"offsets": "data_offsets"}.get(what, what)] = value


def _mutate_bytes(original: _Original, ops: list[tuple]) -> bytes:
    data = bytearray(original.bytes)
    for op in ops:
        kind, args = op[0], op[1:]
        size = len(data)
        if kind == "flip" and size:
            region, position, xor = args
            start, end = {
                "length": (0, 8),
                "header": (8, 8 + original.header_len),
                "data": (8 + original.header_len, size),
            }[region]
            end = min(end, size)
            if start < end:
                data[start + position % (end - start)] ^= xor
        elif kind == "truncate":
            del data[args[0] % max(size, 1) :]
        elif kind == "extend":
            data += args[0]
        elif kind == "splice" and size:
            src, dst, length = args[0] % size, args[1] % size, args[2]
            data[dst : dst + length] = data[src : src + length]
        elif kind == "insert":
            position = args[0] % (size + 1)
            data[position:position] = args[1]
        elif kind == "delete" and size:
            position = args[0] % size
            del data[position : position + args[1]]
        elif kind == "length" and size >= 8:
            data[:8] = struct.pack("<Q", args[0])
        elif kind == "header" and size >= 8:
            data = bytearray(_apply_header_edit(bytes(data), args[0]))
    return bytes(data)


@pytest.mark.slow
def test_byte_level_mutations_load_correctly_or_raise_clr_error(original, record_property):
    outcomes: Counter = Counter()

    @_budget(BYTE_CASES)
    @given(ops=st.lists(_byte_op, min_size=1, max_size=3))
    def case(ops: list[tuple]) -> None:
        original.case.write_bytes(_mutate_bytes(original, ops))
        _load_and_check(original, original.case, outcomes)

    case()
    _report("byte_mutations", outcomes, record_property)
    assert sum(v for k, v in outcomes.items() if k != "loaded, as the original") == BYTE_CASES
    assert outcomes["loaded"] and len(outcomes) > 3, "the mutations should reach both outcomes and many errors"


# ------------------------------------------------------------------------------------------ content mutations

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from([0, 1, 3, 5, 7, -1, 2**63, "3", "clr", "scale", "skip", "layer1.*", "conv1", "é😀", ""]),
)
_json_values = st.recursive(
    _json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
)
_odd_strings = st.sampled_from(
    [
        "",
        "null",
        "{",
        "[" * 5000 + "]" * 5000,  # deeper than Python's JSON recursion limit
        '{"a":' * 3000 + "1" + "}" * 3000,
        "1" * 5000,  # more digits than Python converts to int by default
        "1e999",
        "NaN",
        "Infinity",
        "-0",
        "\uff11",  # a unicode digit (FULLWIDTH DIGIT ONE), which int() accepts
        "\x00",
        "🧪" * 100,
        "a" * 100_000,
    ]
)
_meta_value = st.one_of(_json_values.map(json.dumps), st.text(max_size=40), _odd_strings)
_META_KEYS = [
    "format",
    "clr_format",
    "clr_format_version",
    "config",
    "num_classes",
    "label_names",
    "task",
    "backbone_fingerprint",
    "versions",
    "architecture",
    "pretrained_tag",
    "hf_hub_id",
]
_CONFIG_KEYS = [
    "kernel_size",
    "include",
    "exclude",
    "depthwise",
    "train_norms",
    "update_norm_stats",
    "train_head",
    "rank",
    "",
    "é",
]
_TENSOR_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]
_content_op = st.one_of(
    st.tuples(st.just("meta_set"), st.sampled_from([*_META_KEYS, "extra", "é"]), _meta_value),
    st.tuples(st.just("meta_drop"), st.sampled_from(_META_KEYS)),
    st.tuples(st.just("config_set"), st.sampled_from(_CONFIG_KEYS), _json_values),
    st.tuples(st.just("config_drop"), st.sampled_from(_CONFIG_KEYS)),
    st.tuples(st.just("config_replace"), _meta_value),
    st.tuples(st.just("tensor_drop"), _position),
    st.tuples(st.just("tensor_add"), st.text(max_size=30), st.lists(st.integers(0, 4), max_size=4)),
    st.tuples(st.just("tensor_rename"), _position, st.text(max_size=30)),
    st.tuples(st.just("tensor_dtype"), _position, st.sampled_from(_TENSOR_DTYPES)),
    st.tuples(st.just("tensor_shape"), _position, st.lists(st.integers(0, 70), max_size=4)),
    st.tuples(
        st.just("tensor_value"), _position, _position, st.sampled_from([math.nan, math.inf, -math.inf, 1e30, 0.0])
    ),
)


def _mutate_content(original: _Original, ops: list[tuple]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {k: v.clone() for k, v in original.tensors.items()}
    meta = dict(original.metadata)
    for op in ops:
        kind, args = op[0], op[1:]
        names = sorted(tensors)
        pick = names[args[0] % len(names)] if names and isinstance(args[0], int) else None
        if kind == "meta_set":
            meta[args[0]] = args[1]
        elif kind == "meta_drop":
            meta.pop(args[0], None)
        elif kind in ("config_set", "config_drop"):
            try:
                config = json.loads(meta.get("config", "{}"))
            except (ValueError, RecursionError):
                continue
            if not isinstance(config, dict):
                continue
            if kind == "config_set":
                config[args[0]] = args[1]
            else:
                config.pop(args[0], None)
            meta["config"] = json.dumps(config)
        elif kind == "config_replace":
            meta["config"] = args[0]
        elif kind == "tensor_drop" and pick:
            del tensors[pick]
        elif kind == "tensor_add":
            tensors[args[0]] = torch.zeros(args[1])
        elif kind == "tensor_rename" and pick:
            tensors[args[1]] = tensors.pop(pick)
        elif kind == "tensor_dtype" and pick:
            tensors[pick] = tensors[pick].to(args[1])
        elif kind == "tensor_shape" and pick:
            t, n = tensors[pick].reshape(-1), math.prod(args[1])
            filled = t.repeat(n // t.numel() + 1)[:n] if t.numel() else torch.zeros(n, dtype=t.dtype)
            tensors[pick] = filled.reshape(args[1]).contiguous()
        elif kind == "tensor_value" and pick:
            t = tensors[pick]
            if t.is_floating_point() and t.numel():
                t.view(-1)[args[1] % t.numel()] = args[2]
    return tensors, meta


@pytest.mark.slow
def test_content_mutations_load_correctly_or_raise_clr_error(original, record_property):
    outcomes: Counter = Counter()

    @_budget(CONTENT_CASES)
    @given(ops=st.lists(_content_op, min_size=1, max_size=4))
    # Cases each of which once got past the loader (fixed since): they always run, on top of the random budget.
    @example(ops=[("config_replace", "[" * 5000 + "]" * 5000)])
    @example(ops=[("meta_set", "label_names", "[" * 5000 + "]" * 5000)])
    @example(ops=[("meta_set", "label_names", '["just one"]')])
    @example(ops=[("meta_set", "task", '"../../outside"')])
    @example(ops=[("meta_set", "clr_format_version", "-1")])
    def case(ops: list[tuple]) -> None:
        tensors, meta = _mutate_content(original, ops)
        try:
            save_file(tensors, str(original.case), metadata=meta)
        except Exception:  # safetensors refuses to write it (e.g. a key that is not valid UTF-8): not a loader case
            outcomes["unwritable"] += 1
            return
        _load_and_check(original, original.case, outcomes)

    case()
    _report("content_mutations", outcomes, record_property)
    assert sum(v for k, v in outcomes.items() if k != "loaded, as the original") == CONTENT_CASES + 5
    assert outcomes["loaded"] and len(outcomes) > 3, "the mutations should reach both outcomes and many errors"


def test_the_unmutated_file_loads_as_the_original(original, record_property):
    outcomes: Counter = Counter()
    _load_and_check(original, original.path, outcomes)
    assert outcomes == Counter({"loaded": 1, "loaded, as the original": 1})
