"""Fuzzing the adapter reader and loader: every mutated or crafted file loads correctly or raises a CLRError, fast.

Each case is a real file on disk, read with ``clr_timm.read_adapter`` and loaded with ``clr_timm.load_adapter`` into a
tiny timm model (``test_resnet``, 3 classes). Cases start from one real adapter and come in three families:

- *bytes*: the byte mutations of ``tests/test_fuzz.py`` (flips in the length field, header and data, truncation,
  extension, splices, insertions, deletions, a rewritten length field, edits of the header's entries);
- *content*: its content mutations, written back through safetensors (metadata and config values of every type,
  missing, extra, reshaped, retyped or non-finite tensors);
- *crafted*: what an attacker would write: files of zeros up to a (sparse) gigabyte, header lengths and tensor sizes
  that claim more than the file holds, headers of up to 1.4 million tensors or 24 MB of metadata, JSON nested or
  repeated to blow up a parser, wrong dtypes, shapes and offsets, configs of 40,000 patterns, heads of 0 classes,
  hostile names, non-finite values, extra tensors, pickles; and valid variants (other head sizes, half precision).

A case passes when read and load either succeed, with the model then holding exactly what the file holds (the oracle
of ``tests/test_fuzz.py``, which also checks that a refused load leaves the model bit-identical), or raise a
``CLRError`` whose message is at most ``--max-message`` characters, each within ``--max-seconds``; a file that
``read_adapter`` accepts must also read the same through safetensors. Nothing may unpickle. Files are made in this
process and read and loaded in a fresh one, so that its peak RSS measures reading and loading alone; that includes
the oracle's own reads of the file (safetensors, twice), so compare a kind's RSS growth to its largest file. The table
gives each kind's cases, outcomes, slowest read and load, longest message, largest file and growth of the loader's
peak RSS; the JSON has the same and every failure. Exit status 1 when any case fails.

It reuses the mutations and the oracle of ``tests/test_fuzz.py``, so it needs the test dependencies (hypothesis).

The README's reliability figures::

    python -m benchmarks.fuzz_adapters --results benchmarks/results        # 10,000 cases, a few minutes on 2 cores

A quick look::

    python -m benchmarks.fuzz_adapters --cases 300 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import pickle
import random
import resource
import struct
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

import clr_timm
from clr_timm.adapter import MAX_METADATA_KEYS, MAX_METADATA_VALUE_CHARS, MAX_TENSORS
from clr_timm.config import MAX_PATTERN_LENGTH, MAX_PATTERNS
from tests.test_fuzz import (
    _CONFIG_KEYS,
    _DTYPES,
    _META_KEYS,
    _TENSOR_DTYPES,
    _load_and_check,
    _mutate_bytes,
    _mutate_content,
    _Original,
)

__all__ = ["KINDS", "run", "format_table", "main"]

MB = 2**20


class _Context:
    """The original adapter (``tests.test_fuzz._Original``), its header and data apart, and the prebuilt huge files."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.original = _Original(folder)
        self.folder = folder
        data = self.original.bytes
        (n,) = struct.unpack("<Q", data[:8])
        self.header = json.loads(data[8 : 8 + n])
        self.data = data[8 + n :]
        self.names = sorted(k for k in self.header if k != "__metadata__")
        self.metadata = self.header["__metadata__"]
        self.huge: dict[str, Path] = {}
        self.slot = folder / "case.safetensors"  # where the case being made is written

    def prebuilt(self, name: str, write: Callable[[Path], None]) -> Path:
        """A large file (the issue's 1.4M tensors, 24 MB of metadata), written once, a chunk at a time."""
        if name not in self.huge:
            self.huge[name] = self.folder / f"{name}.safetensors"
            write(self.huge[name])
        return self.huge[name]


def _raw(header: dict | bytes, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


def _stream_header(path: Path, parts: Iterator[str]) -> None:
    """Write a header-only file whose header is the concatenation of ``parts``, a chunk at a time."""
    with open(path, "wb") as f:
        f.write(b"\0" * 8)
        size = 0
        for part in parts:
            chunk = part.encode()
            f.write(chunk)
            size += len(chunk)
        f.seek(0)
        f.write(struct.pack("<Q", size))


# ------------------------------------------------------------------------------------- mutations of tests/test_fuzz


def _u64(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 7, 8, 2**31, 2**32 - 1, 2**63, 2**64 - 1, rng.getrandbits(64), rng.randrange(1 << 20)])


def _byte_op(rng: random.Random, ctx: _Context) -> tuple:
    position = rng.randrange(2**31)
    kind = rng.choice(["flip", "flip", "truncate", "extend", "splice", "insert", "delete", "length", "header"])
    if kind == "flip":
        return ("flip", rng.choice(["length", "header", "data"]), position, rng.randint(1, 255))
    if kind == "truncate":
        return ("truncate", position)
    if kind in ("extend", "insert"):
        chunk = rng.randbytes(rng.randint(1, 64))
        return ("extend", chunk) if kind == "extend" else ("insert", position, chunk)
    if kind == "splice":
        return ("splice", position, rng.randrange(2**31), rng.randint(1, 256))
    if kind == "delete":
        return ("delete", position, rng.randint(1, 256))
    if kind == "length":
        real = ctx.original.header_len
        return ("length", rng.choice([_u64(rng), real + rng.randint(-16, 16), real * 2]))
    ints = [-2, -1, 0, 1, 2, 3, 64, 2**31, 2**40, rng.randrange(10**6)]
    edit = rng.choice(
        [
            ("dtype", position, rng.choice(_DTYPES)),
            ("shape", position, [rng.choice(ints) for _ in range(rng.randint(0, 5))]),
            ("offsets", position, [rng.choice(ints) for _ in range(rng.randint(0, 3))]),
            ("rename", position, rng.choice(["", "x", "fc.weight", "layer1.0.conv1.clr.weight", "é" * 9])),
            ("drop", position, None),
            ("metadata", 0, rng.choice([None, 0, 7, [], ["a"], "x"])),
        ]
    )
    return ("header", edit)


_ODD_VALUES = [
    "",
    "null",
    "{",
    "[" * 5000 + "]" * 5000,
    '{"a":' * 3000 + "1" + "}" * 3000,
    "1" * 5000,
    "1e999",
    "NaN",
    "-0",
    "\uff11",
    "\x00",
    "🧪" * 100,
    "a" * 100_000,
    "0",
    "3",
    "-1",
    '"pets"',
    '["a", "b", "c"]',
    "[]",
    "{}",
    "true",
]
_JSON_VALUES = [
    None,
    True,
    False,
    0,
    1,
    3,
    5,
    -1,
    2**63,
    1.5,
    "",
    "3",
    "clr",
    "scale",
    "skip",
    "layer1.*",
    [],
    {},
    ["*"],
]


_CONTENT_OPS = [
    "meta_set",
    "meta_drop",
    "config_set",
    "config_drop",
    "config_replace",
    "tensor_drop",
    "tensor_add",
    "tensor_rename",
    "tensor_dtype",
    "tensor_shape",
    "tensor_value",
]


def _content_op(rng: random.Random, ctx: _Context) -> tuple:
    position = rng.randrange(2**31)
    kind = rng.choice(_CONTENT_OPS)
    if kind == "meta_set":
        value = rng.choice([rng.choice(_ODD_VALUES), json.dumps(rng.choice(_JSON_VALUES)), rng.choice(ctx.names)])
        return ("meta_set", rng.choice([*_META_KEYS, "extra", "é"]), value)
    if kind == "meta_drop":
        return ("meta_drop", rng.choice(_META_KEYS))
    if kind == "config_set":
        return ("config_set", rng.choice(_CONFIG_KEYS), rng.choice(_JSON_VALUES))
    if kind == "config_drop":
        return ("config_drop", rng.choice(_CONFIG_KEYS))
    if kind == "config_replace":
        return ("config_replace", rng.choice(_ODD_VALUES))
    if kind == "tensor_drop":
        return ("tensor_drop", position)
    if kind == "tensor_add":
        name = rng.choice(["junk", "fc.extra", "layer1.0.conv1.clr.bias", ""])
        return ("tensor_add", name, [rng.randint(0, 4) for _ in range(rng.randint(0, 4))])
    if kind == "tensor_rename":
        return ("tensor_rename", position, rng.choice(["junk", "", "fc.weight ", rng.choice(ctx.names)]))
    if kind == "tensor_dtype":
        return ("tensor_dtype", position, rng.choice(_TENSOR_DTYPES))
    if kind == "tensor_shape":
        return ("tensor_shape", position, [rng.randint(0, 70) for _ in range(rng.randint(0, 4))])
    return ("tensor_value", position, rng.randrange(2**31), rng.choice([math.nan, math.inf, -math.inf, 1e30, 0.0]))


def _bytes(rng: random.Random, ctx: _Context) -> bytes:
    return _mutate_bytes(ctx.original, [_byte_op(rng, ctx) for _ in range(rng.randint(1, 3))])


def _content(rng: random.Random, ctx: _Context) -> bytes:
    for _ in range(100):
        tensors, meta = _mutate_content(ctx.original, [_content_op(rng, ctx) for _ in range(rng.randint(1, 4))])
        try:
            return safetensors_save(tensors, metadata=meta)
        except Exception:  # safetensors refuses to write it (a key that is not valid UTF-8...): not a loader case
            continue
    return ctx.original.bytes


# ------------------------------------------------------------------------------------------------ crafted files


def _zeros(rng: random.Random, ctx: _Context) -> bytes | Path:
    if rng.random() < 0.05:
        path = ctx.folder / "gigabyte.safetensors"
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(2**30)  # sparse: a gigabyte of zeros that takes no disk
        return path
    return bytes(rng.choice([0, 1, 7, 8, 9, 100, 4096, 65536]))


def _claimed_sizes(rng: random.Random, ctx: _Context) -> bytes:
    data = ctx.original.bytes
    how = rng.randrange(4)
    if how == 0:  # the length field claims more than the file, or more than any header
        claimed = rng.choice([len(data), len(data) - 7, 2**63, 2**64 - 1, 200 * MB, rng.getrandbits(64)])
        return struct.pack("<Q", claimed) + data[8:]
    header = json.loads(json.dumps(ctx.header))
    entry = header[rng.choice(ctx.names)]
    if how == 1:  # a tensor claiming terabytes
        shape = rng.choice([[2**20, 2**20], [2**31 - 1, 4], [2**16] * 4, [10**12]])
        entry.update(dtype="F32", shape=shape, data_offsets=[0, math.prod(shape) * 4])
    elif how == 2:  # a tensor running past the data
        entry["data_offsets"] = [entry["data_offsets"][0], len(ctx.data) + rng.randint(1, 2**40)]
    else:  # the right sizes, but the data cut short
        return _raw(header, ctx.data[: rng.randrange(len(ctx.data))])
    return _raw(header, ctx.data)


def _write_many(n: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
        chunks = (",".join(entry.format(i) for i in range(j, min(j + 10_000, n))) for j in range(0, n, 10_000))
        _stream_header(path, itertools.chain(["{"], _join(chunks), ["}"]))

    return write


def _join(chunks: Iterator[str]) -> Iterator[str]:
    for i, chunk in enumerate(chunks):
        yield ("," if i else "") + chunk


def _many_tensors(rng: random.Random, ctx: _Context) -> Path:
    if rng.random() < 0.02:  # the file: 1.4 million empty tensors, a 77 MB header
        return ctx.prebuilt("many-1.4M", _write_many(1_400_000))
    _write_many(rng.choice([MAX_TENSORS + 1, 20_000, 60_000]))(ctx.slot)
    return ctx.slot


def _big_metadata(rng: random.Random, ctx: _Context) -> bytes | Path:
    how = rng.randrange(5)
    if how == 0 and rng.random() < 0.05:  # the 24 MB of metadata
        return ctx.prebuilt(
            "metadata-24MB", lambda p: _stream_header(p, iter(['{"__metadata__":{"x":"', *["a" * MB] * 24, '"}}']))
        )
    meta = dict(ctx.metadata)
    if how <= 1:
        meta[rng.choice(["x", "label_names", "config"])] = "a" * (MAX_METADATA_VALUE_CHARS + rng.randint(1, 1000))
    elif how == 2:
        meta.update({f"k{i}": "a" * (MB + 100) for i in range(4)})
    elif how == 3:
        meta.update({f"k{i}": "" for i in range(MAX_METADATA_KEYS + rng.randint(1, 1000))})
    else:  # label names for a million classes: within the bounds, refused by the head
        meta["label_names"] = json.dumps(["ab"] * rng.choice([10_000, 200_000]))
    return _raw({**ctx.header, "__metadata__": meta}, ctx.data)


def _header_json(rng: random.Random, ctx: _Context) -> bytes:
    header = json.dumps(ctx.header, separators=(",", ":"))
    n = rng.choice([1_000, 100_000, 2_000_000])
    how = rng.randrange(9)
    if how == 0:
        return _raw(('{"x":[' + ",".join(["[]"] * n) + "]," + header[1:]).encode(), ctx.data)
    if how == 1:
        depth = min(n, 200_000)
        return _raw(('{"x":' + "[" * depth + "]" * depth + "," + header[1:]).encode(), ctx.data)
    if how == 2:
        first = ctx.names[0]
        return _raw(
            ("{" + json.dumps(first) + ":" + json.dumps(ctx.header[first]) + "," + header[1:]).encode(), ctx.data
        )
    if how == 3:
        return _raw(rng.choice([b'{"\xff":1}', b"\xef\xbb\xbf{}", b"[]", b'"x"', b"1", b"{" * 100]), ctx.data)
    if how == 4:  # whitespace around the header: valid, as safetensors pads it
        return _raw((" " * rng.randint(1, 8) + header + " " * rng.randint(0, 8)).encode(), ctx.data)
    if how == 5:  # fields safetensors ignores: valid
        edited = json.loads(header)
        edited[rng.choice(ctx.names)]["x"] = rng.choice([1, "a", None, [1, 2]])
        return _raw(edited, ctx.data)
    if how == 6:
        return _raw(header.replace('"shape":[', '"shape":[NaN,', 1).encode(), ctx.data)
    if how == 7:
        return _raw(('{"x":"' + "\\" * (2 * rng.randint(1, n)) + '",' + header[1:]).encode(), ctx.data)
    return _raw(('{"x":[' + ",".join(['""'] * n) + "]," + header[1:]).encode(), ctx.data)


def _entries(rng: random.Random, ctx: _Context) -> bytes:
    header = json.loads(json.dumps(ctx.header))
    name = rng.choice(ctx.names)
    entry = header[name]
    how = rng.randrange(3)
    if how == 0:
        entry["dtype"] = rng.choice(["F8_E4M3", "F8_E5M2", "C64", "U16", "U32", "U64", "f32", "", None, 5, ["F32"]])
    elif how == 1:
        entry["shape"] = rng.choice(
            [[-1], [1.5], [True], [1] * rng.randint(9, 64), [2**31], [0, 2**62], "4", None, [[1]], [2**64]]
        )
    else:
        a, b = entry["data_offsets"]
        other = header[rng.choice(ctx.names)]["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], other, [a, b, b], [a], ["0", b], [a - 1, b - 1], [a, b + 4], None])
    return _raw(header, ctx.data)


def _config(rng: random.Random, ctx: _Context) -> bytes:
    config = json.loads(ctx.metadata["config"])
    how = rng.randrange(6)
    if how == 0:
        n = rng.choice([MAX_PATTERNS + 1, 5000, 40_000])
        config[rng.choice(["include", "exclude"])] = [f"blocks.{i}.*" for i in range(n)]
    elif how == 1:
        config["exclude"] = ["x" * rng.choice([MAX_PATTERN_LENGTH + 1, 10_000])]
    elif how == 2:  # the costliest patterns the limits allow, matching nothing: a valid file
        star = "*q" * (MAX_PATTERN_LENGTH // 2 - 3)
        config["exclude"] = [f"{star}{i}" for i in range(rng.choice([1, 16, MAX_PATTERNS]))]
    elif how == 3:
        field = rng.choice(["include", "exclude", "kernel_size", "depthwise", "layer", "train_head"])
        config[field] = rng.choice([5, "3", 3.0, True, None, {"a": 1}, [[1]], [1], 10**30 + 1, -3, "x" * 1000])
    elif how == 4:
        depth = rng.choice([20, 900, 5000])
        text = json.dumps(config)[:-1] + ', "include": ' + "[" * depth + "]" * depth + "}"
        return _raw({**ctx.header, "__metadata__": {**ctx.metadata, "config": text}}, ctx.data)
    else:
        config[rng.choice(["rank", "", "é", "kernel_size "])] = 1
    return _raw({**ctx.header, "__metadata__": {**ctx.metadata, "config": json.dumps(config)}}, ctx.data)


def _head(rng: random.Random, ctx: _Context) -> bytes:
    tensors = {k: v.clone() for k, v in ctx.original.tensors.items()}
    meta = dict(ctx.metadata)
    how = rng.randrange(5)
    if how == 0:  # the file: a head of 0 classes, with tensors to match
        tensors["fc.weight"], tensors["fc.bias"] = tensors["fc.weight"][:0], tensors["fc.bias"][:0]
        meta.update(num_classes="0", label_names="null")
    elif how == 1:  # a valid head for another number of classes
        k = rng.choice([1, 2, 7, 100])
        tensors["fc.weight"] = torch.randn(k, tensors["fc.weight"].shape[1]) * 0.01
        tensors["fc.bias"] = torch.zeros(k)
        meta.update(num_classes=str(k), label_names=json.dumps([f"c{i}" for i in range(k)]))
    elif how == 2:
        meta["num_classes"] = rng.choice(["-1", str(10**18), "1e3", "4"])
    elif how == 3:  # no head tensors, and a huge number of classes to make one of
        del tensors["fc.weight"], tensors["fc.bias"]
        meta.update(num_classes=str(10**9), label_names="null")
    else:
        meta["label_names"] = json.dumps(["a"] * rng.choice([0, 2, 4]))
    return safetensors_save(tensors, metadata=meta)


def _names(rng: random.Random, ctx: _Context) -> bytes:
    meta = dict(ctx.metadata)
    long = "x" * rng.choice([256, 3000, 100_000])
    key, value = rng.choice(
        [
            ("task", json.dumps(long)),
            ("task", json.dumps(rng.choice(["a\x00b", "a\nb", "../x", "a/b", ".", "\x1b[2J", "C:", "a" * 255]))),
            ("label_names", json.dumps([long, "b", "c"])),
            ("label_names", json.dumps(["\x1b[31m", "\x00", "é"])),
            ("architecture", rng.choice([long, "resnet50", "\x1b[2J"])),
            ("backbone_fingerprint", rng.choice([long, "0" * 32, ""])),
            ("hf_hub_id", long),
            ("clr_format", long),
        ]
    )
    meta[key] = value
    return _raw({**ctx.header, "__metadata__": meta}, ctx.data)


def _values(rng: random.Random, ctx: _Context) -> bytes:
    tensors = {k: v.clone() for k, v in ctx.original.tensors.items()}
    how = rng.randrange(3)
    if how == 0:
        t = tensors[rng.choice([k for k, v in tensors.items() if v.is_floating_point() and v.numel()])]
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        return safetensors_save(tensors, metadata=ctx.metadata)
    if how == 1:  # a boolean tensor holding a byte that is not 0 or 1
        header = {
            **ctx.header,
            "flag": {"dtype": "BOOL", "shape": [1], "data_offsets": [len(ctx.data), len(ctx.data) + 1]},
        }
        return _raw(header, ctx.data + bytes([rng.choice([1, 2, 255])]))
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64])  # valid: other storage precisions
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return safetensors_save(tensors, metadata=ctx.metadata)


def _extra(rng: random.Random, ctx: _Context) -> bytes:
    tensors = dict(ctx.original.tensors)
    name = rng.choice(["junk", "layer9.clr.weight", "fc.weight2", "x" * rng.choice([10, 10_000])])
    tensors[name] = torch.zeros(rng.choice([0, 1, 1000, MB // 4]))
    return safetensors_save(tensors, metadata=ctx.metadata)


def _valid(rng: random.Random, ctx: _Context) -> bytes:
    header = json.loads(json.dumps(ctx.header))
    items = list(header.items())
    rng.shuffle(items)
    meta = dict(ctx.metadata)
    if rng.random() < 0.5:
        meta["extra"] = rng.choice(["", "x" * 1000, "é😀"])
    return _raw({**dict(items), "__metadata__": meta}, ctx.data)


def _pickle(rng: random.Random, ctx: _Context) -> bytes:
    return rng.choice([b"PK\x03\x04", b"\x80\x02", b"\x80\x05", b"\x80\x04\x95"]) + rng.randbytes(rng.randint(0, 200))


KINDS: dict[str, tuple[float, Callable[[random.Random, _Context], bytes | Path]]] = {
    "bytes": (0.30, _bytes),
    "content": (0.30, _content),
    "zeros": (0.025, _zeros),
    "claimed sizes": (0.04, _claimed_sizes),
    "many tensors": (0.015, _many_tensors),
    "big metadata": (0.025, _big_metadata),
    "header JSON": (0.04, _header_json),
    "entries": (0.04, _entries),
    "config": (0.04, _config),
    "head": (0.04, _head),
    "names": (0.04, _names),
    "values": (0.03, _values),
    "extra tensors": (0.025, _extra),
    "valid": (0.02, _valid),
    "pickle": (0.015, _pickle),
}
"""Kind of case -> (share of the cases, generator of one case's file)."""


# ------------------------------------------------------------------------------------------------------ running


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MB if sys.platform == "darwin" else 1024)


@contextlib.contextmanager
def _never_unpickle() -> Iterator[None]:
    def refuse(*args, **kwargs):
        raise AssertionError("the adapter loader tried to unpickle something")

    saved = {(pickle, n): getattr(pickle, n) for n in ("load", "loads", "Unpickler")} | {(torch, "load"): torch.load}
    for module, name in saved:
        setattr(module, name, refuse)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


class _Outcome:
    """What one kind's cases did."""

    def __init__(self) -> None:
        self.cases = 0
        self.read: Counter = Counter()
        self.load: Counter = Counter()
        self.failures: list[str] = []
        self.max_read_s = self.max_load_s = 0.0
        self.max_message = 0
        self.rss_growth_mb = 0.0
        self.largest_mb = 0.0

    def add(self, case: dict, size: int, rss_growth_mb: float, max_seconds: float) -> None:
        self.cases += 1
        self.largest_mb = max(self.largest_mb, size / MB)
        self.read[case["read"]] += 1
        self.load.update(case["load"])
        self.failures += case["failures"]
        self.max_read_s, self.max_load_s = max(self.max_read_s, case["read_s"]), max(self.max_load_s, case["load_s"])
        self.max_message = max(self.max_message, case["max_message"])
        self.rss_growth_mb = max(self.rss_growth_mb, rss_growth_mb)
        if max(case["read_s"], case["load_s"]) > max_seconds:
            self.failures.append(f"{case['path']}: read {case['read_s']:.2f} s, load {case['load_s']:.2f} s")


def _check_read(path: Path, case: dict, max_message: int) -> None:
    """read_adapter: a CLRError with a short message, or what safetensors reads from the file."""
    start = time.perf_counter()
    try:
        adapter = clr_timm.read_adapter(path)
    except clr_timm.CLRError as e:
        case.update(read=type(e).__name__, read_s=time.perf_counter() - start)
        _check_message(e, "read", case, max_message)
        return
    except Exception as e:
        case.update(read=type(e).__name__, read_s=time.perf_counter() - start)
        case["failures"].append(f"read: {type(e).__name__}: {str(e)[:300]}")
        return
    case.update(read="read", read_s=time.perf_counter() - start)
    try:
        theirs = load_file(str(path))
    except Exception as e:
        case["failures"].append(f"read_adapter accepted a file safetensors refuses ({str(e)[:200]})")
        return
    if set(theirs) != set(adapter.tensors) or not all(
        t.dtype == adapter.tensors[k].dtype and torch.equal(t, adapter.tensors[k]) for k, t in theirs.items()
    ):
        case["failures"].append("read_adapter read other tensors than safetensors")


def _check_message(error: Exception, where: str, case: dict, max_message: int) -> None:
    case["max_message"] = max(case["max_message"], len(str(error)))
    if len(str(error)) > max_message:
        case["failures"].append(f"{where}: a message of {len(str(error))} characters: {str(error)[:200]}")


def _check_load(original: _Original, path: Path, case: dict, max_message: int) -> None:
    """load_adapter, checked by tests/test_fuzz.py's oracle (a correct load, or a refusal leaving the model as it was).

    Times load_adapter itself, not the oracle's checks after it.
    """
    load = clr_timm.load_adapter
    outcomes: Counter = Counter()

    def timed(model, source, **kwargs):
        start = time.perf_counter()
        try:
            return load(model, source, **kwargs)
        except clr_timm.CLRError as e:
            _check_message(e, "load", case, max_message)
            raise
        finally:
            case["load_s"] += time.perf_counter() - start

    clr_timm.load_adapter = timed
    try:
        _load_and_check(original, path, outcomes)
    except Exception as e:  # the oracle's assertions, or an error that is not a CLRError
        case["failures"].append(f"load: {type(e).__name__}: {str(e)[:300]}")
        outcomes[type(e).__name__] += 1
        original.model = original.fresh()
    finally:
        clr_timm.load_adapter = load
    case["load"] = dict(outcomes)


def _loader(conn, folder: str, max_message: int) -> None:
    """The process under test: reads and loads each file it is sent, and answers what happened and its peak RSS.

    Files are made in another process, so that this one's peak RSS measures reading and loading alone.
    """
    torch.set_num_threads(1)
    with _never_unpickle():
        Path(folder).mkdir(parents=True)
        original = _Original(Path(folder))
        _check_load(original, original.path, {"failures": [], "max_message": 0, "load_s": 0.0}, max_message)
        # After a first load (the caches it builds are not a case's cost), with what the oracle compares loads to.
        conn.send((_peak_rss_mb(), hashlib.sha256(original.bytes).hexdigest()))
        while (path := conn.recv()) is not None:
            case = {"path": path, "failures": [], "max_message": 0, "read_s": 0.0, "load_s": 0.0}
            _check_read(Path(path), case, max_message)
            _check_load(original, Path(path), case, max_message)
            conn.send({**case, "peak_rss_mb": _peak_rss_mb()})


def _receive(conn, loader, timeout: float):
    if not conn.poll(timeout):
        raise RuntimeError(f"the loader answered nothing for {timeout:.0f} s: a case hangs")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"the loader died (exit code {loader.exitcode}): a case crashed it") from None


def run(cases: int, seed: int = 0, max_seconds: float = 2.0, max_message: int = 2000, hang_s: float = 120) -> dict:
    """Run ``cases`` cases; returns the results by kind, and overall.

    This process makes the files (two at a time, so that making one overlaps loading the other); a fresh process
    reads and loads them. A case that takes ``hang_s`` or kills the loader ends the run as a failure.
    """
    rng = random.Random(seed)
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    by_kind: dict[str, _Outcome] = defaultdict(_Outcome)
    multiprocessing = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="clr_timm-fuzz-") as folder:
        ctx = _Context(Path(folder) / "maker")
        conn, theirs = multiprocessing.Pipe()
        loader = multiprocessing.Process(target=_loader, args=(theirs, str(Path(folder) / "loader"), max_message))
        loader.start()
        try:
            peak, original = _receive(conn, loader, 600)
            baseline = peak
            if original != hashlib.sha256(ctx.original.bytes).hexdigest():
                raise RuntimeError("the loader's original adapter is not the one the cases are made from")
            start = time.perf_counter()
            pending: deque[tuple[str, int]] = deque()

            def collect() -> None:
                nonlocal peak
                case = _receive(conn, loader, hang_s)
                kind, size = pending.popleft()
                by_kind[kind].add(case, size, case["peak_rss_mb"] - peak, max_seconds)
                peak = case["peak_rss_mb"]

            for i in range(cases):
                kind = kinds[i] if i < len(kinds) else rng.choices(kinds, weights)[0]  # every kind at least once
                ctx.slot = Path(folder) / f"case-{i % 2}.safetensors"
                made = KINDS[kind][1](rng, ctx)
                if not isinstance(made, Path):
                    ctx.slot.write_bytes(made)
                    made = ctx.slot
                conn.send(str(made))
                pending.append((kind, made.stat().st_size))
                if len(pending) == 2:
                    collect()
            while pending:
                collect()
            wall = time.perf_counter() - start
            conn.send(None)
        finally:
            loader.join(timeout=30)
            if loader.is_alive():
                loader.kill()
        growth = peak - baseline
    rows = {
        kind: {
            "cases": o.cases,
            "read": dict(o.read),
            "load": dict(o.load),
            "failures": o.failures,
            "max_read_s": round(o.max_read_s, 4),
            "max_load_s": round(o.max_load_s, 4),
            "max_message_chars": o.max_message,
            "largest_file_mb": round(o.largest_mb, 1),
            "peak_rss_growth_mb": round(o.rss_growth_mb, 1),
        }
        for kind, o in sorted(by_kind.items(), key=lambda kv: kinds.index(kv[0]))
    }
    total_load: Counter = Counter()
    for o in by_kind.values():
        total_load.update(o.load)
    return {
        "cases": sum(o.cases for o in by_kind.values()),
        "seed": seed,
        "failures": sum(len(o.failures) for o in by_kind.values()),
        "loaded": total_load["loaded"],
        "refused": sum(v for k, v in total_load.items() if k.endswith("Error")),
        "load_outcomes": dict(total_load),
        "max_read_s": max(o.max_read_s for o in by_kind.values()),
        "max_load_s": max(o.max_load_s for o in by_kind.values()),
        "max_message_chars": max(o.max_message for o in by_kind.values()),
        "peak_rss_growth_mb": round(growth, 1),
        "wall_s": round(wall, 1),
        "model": "test_resnet",
        "torch": torch.__version__,
        "kinds": rows,
    }


def format_table(results: dict) -> str:
    """The markdown table of a run: one row per kind of case, and the total."""
    lines = [
        "| kind | cases | read | loaded | refused (CLRError) | failures | slowest read s | slowest load s "
        "| longest message | largest file MB | peak RSS growth MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in results["kinds"].items():
        refused = sum(v for k, v in row["load"].items() if k.endswith("Error"))
        lines.append(
            f"| {kind} | {row['cases']:,} | {row['read'].get('read', 0):,} | {row['load'].get('loaded', 0):,} "
            f"| {refused:,} | {len(row['failures'])} | {row['max_read_s']:.3f} | {row['max_load_s']:.3f} "
            f"| {row['max_message_chars']:,} | {row['largest_file_mb']:,.1f} | {row['peak_rss_growth_mb']:.1f} |"
        )
    lines.append(
        f"| **all** | **{results['cases']:,}** | | **{results['loaded']:,}** | **{results['refused']:,}** "
        f"| **{results['failures']}** | {results['max_read_s']:.3f} | {results['max_load_s']:.3f} "
        f"| {results['max_message_chars']:,} | | {results['peak_rss_growth_mb']:.1f} (whole run) |"
    )
    outcomes = ", ".join(f"{k}: {v:,}" for k, v in sorted(results["load_outcomes"].items(), key=lambda kv: -kv[1]))
    return "\n".join(lines) + f"\n\nload_adapter outcomes: {outcomes}."


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=2.0, help="slowest read or load a case may take")
    parser.add_argument("--max-message", type=int, default=2000, help="longest error message allowed")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--md", help="write the table here")
    parser.add_argument("--results", metavar="DIR", help="write fuzz_adapters.json and fuzz_adapters.md into DIR")
    args = parser.parse_args(argv)
    results = run(args.cases, args.seed, args.max_seconds, args.max_message)
    command = "python -m benchmarks.fuzz_adapters" + (f" --cases {args.cases}" if args.cases != 10_000 else "")
    table = format_table(results)
    summary = (
        f"{results['cases']:,} cases (seed {args.seed}) in {results['wall_s']:.0f} s: {results['loaded']:,} loaded, "
        f"{results['refused']:,} refused with a CLRError, {results['failures']} failures."
    )
    print(table)
    print(f"\n{summary}")
    for kind, row in results["kinds"].items():
        for failure in row["failures"][:5]:
            print(f"FAILURE ({kind}): {failure}", file=sys.stderr)
    json_path = args.json or (Path(args.results) / "fuzz_adapters.json" if args.results else None)
    md_path = args.md or (Path(args.results) / "fuzz_adapters.md" if args.results else None)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"command": command, **results}, indent=2) + "\n")
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(f"# Fuzzing the adapter loader\n\nGenerated by `{command}`. {summary}\n\n{table}\n")
    return results


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
