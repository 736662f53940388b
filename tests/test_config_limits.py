"""CLRConfig from hostile JSON: limits on patterns, matching that costs a regex per conv, only ConfigError out."""

from __future__ import annotations

import fnmatch
import json
import random
import time

import pytest
import timm
import torch

import clr_timm
from clr_timm.config import MAX_PATTERN_LENGTH, MAX_PATTERNS, CLRConfig

from ._models import make_model


def _names(model_name: str) -> list[str]:
    with torch.device("meta"):
        return [n for n, _ in timm.create_model(model_name).named_modules() if n]


# ---------------------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_the_most_patterns_of_the_longest_length_are_accepted(field):
    patterns = [f"{i:03d}" + "x" * (MAX_PATTERN_LENGTH - 3) for i in range(MAX_PATTERNS)]
    config = CLRConfig(**{field: patterns})
    assert getattr(CLRConfig.from_json(config.to_json()), field) == patterns


@pytest.mark.parametrize("field", ["include", "exclude"])
@pytest.mark.parametrize(
    "patterns, message",
    [
        ([f"p{i}" for i in range(MAX_PATTERNS + 1)], f"at most {MAX_PATTERNS}"),
        (["x" * (MAX_PATTERN_LENGTH + 1)], f"at most {MAX_PATTERN_LENGTH}"),
        ((f"p{i}" for i in range(10**9)), f"more than {MAX_PATTERNS}"),  # an endless iterable costs a refusal
    ],
    ids=["count", "length", "iterable"],
)
def test_patterns_beyond_the_limits_raise_config_error(field, patterns, message):
    with pytest.raises(clr_timm.ConfigError, match=message):
        CLRConfig(**{field: patterns})


def test_a_config_of_forty_thousand_patterns_is_refused_at_once():
    text = json.dumps({"exclude": [f"blocks.{i}.*" for i in range(40_000)]})  # took 57 s to load, 40 s per save
    start = time.perf_counter()
    with pytest.raises(clr_timm.ConfigError, match="separators"):
        CLRConfig.from_json(text)
    assert time.perf_counter() - start < 0.5


def test_a_file_whose_config_lists_forty_thousand_patterns_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = clr_timm.attach(make_model("test_resnet", num_classes=3))
    path = clr_timm.save_adapter(model, tmp_path / "a.safetensors")
    meta = dict(clr_timm.read_adapter(path).metadata)
    meta["config"] = json.dumps({"exclude": [f"blocks.{i}.*" for i in range(40_000)]})
    save_file(load_file(str(path)), str(path), metadata=meta)
    start = time.perf_counter()
    with pytest.raises(clr_timm.AdapterError, match="invalid CLRConfig"):
        clr_timm.load_adapter(make_model("test_resnet", num_classes=3), path)
    assert time.perf_counter() - start < 1


# -------------------------------------------------------------------------------------------------------- matching


def _reference_targets(model, include, exclude) -> list[str]:
    """The targets as the old matching chose them: every conv against every pattern with fnmatch."""
    everything = clr_timm.plan_targets(model, CLRConfig())
    return [
        t.name
        for t in everything.targets
        if (include is None or any(fnmatch.fnmatchcase(t.name, p) for p in include))
        and not any(fnmatch.fnmatchcase(t.name, p) for p in exclude)
    ]


def _random_pattern(rng: random.Random, names: list[str]) -> str:
    name = rng.choice(names)
    parts = list(name)
    for _ in range(rng.randint(0, 3)):
        i = rng.randrange(len(parts))
        parts[i] = rng.choice(["*", "?", "[0-9]", "[!0-3]", "[a-c]", "**", ".", "[.]", "\\", "(", "+", "^", "$"])
    if rng.random() < 0.3:
        parts = [*parts[: rng.randrange(1, len(parts) + 1)], "*"]
    return "".join(parts)


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b0", "densenet121"])
def test_compiled_matching_chooses_what_fnmatch_chooses(model_name):
    with torch.device("meta"):
        model = timm.create_model(model_name)
    names = _names(model_name)
    rng = random.Random(model_name)
    for _ in range(40):
        include = [_random_pattern(rng, names) for _ in range(rng.randint(1, 8))] if rng.random() < 0.5 else None
        exclude = [_random_pattern(rng, names) for _ in range(rng.randint(0, 8))]
        plan = clr_timm.plan_targets(model, CLRConfig(include=include, exclude=exclude))
        assert [t.name for t in plan.targets] == _reference_targets(model, include, exclude), (include, exclude)


def test_planning_with_the_costliest_patterns_allowed_is_fast():
    with torch.device("meta"):
        model = timm.create_model("densenet121")
    # The worst the limits allow: every pattern all wildcards, none matching, so every conv is tried against all.
    star = "*q" * (MAX_PATTERN_LENGTH // 2 - 3)
    config = CLRConfig(
        include=[f"{star}{i}" for i in range(MAX_PATTERNS)], exclude=[f"{i}{star}" for i in range(MAX_PATTERNS)]
    )
    start = time.perf_counter()
    plan = clr_timm.plan_targets(model, config)
    first = time.perf_counter() - start
    start = time.perf_counter()
    clr_timm.plan_targets(model, config)
    again = time.perf_counter() - start
    assert plan.targets == [] and first < 3 and again < 0.1, (first, again)


# ------------------------------------------------------------------------------------ hostile JSON, ConfigError only

_HOSTILE_JSON = [
    "[" * 100_000 + "]" * 100_000,
    '{"include": ' + "[" * 900 + "]" * 900 + "}",
    '{"a": ' * 5000 + "1" + "}" * 5000,
    '{"include": [["layer1.*"]]}',
    '{"include": {"layer1.*": 1}}',
    '{"include": 5}',
    '{"exclude": null}',
    '{"exclude": [1, 2]}',
    '{"kernel_size": "3"}',
    '{"kernel_size": 3.0}',
    '{"kernel_size": true}',
    '{"kernel_size": 1' + "0" * 5000 + "}",
    '{"kernel_size": 1e999}',
    '{"depthwise": ["clr"]}',
    '{"layer": {}}',
    '{"pointwise": null}',
    '{"train_head": "yes"}',
    '{"rank": 4}',
    '{"": 1}',
    "[]",
    "null",
    "3",
    '"clr"',
    "",
    "{",
    "\ud800",
    b"\xff\xfe",
    b'{"kernel_size": 3}',
    None,
    3,
    ["kernel_size"],
]


@pytest.mark.parametrize("text", _HOSTILE_JSON, ids=range(len(_HOSTILE_JSON)))
def test_config_json_of_any_shape_raises_only_config_error(text):
    try:
        config = CLRConfig.from_json(text)
    except clr_timm.ConfigError as e:
        assert len(str(e)) < 1000
    else:
        assert config == CLRConfig()  # the one valid text above: b'{"kernel_size": 3}'


@pytest.mark.parametrize(
    "data",
    [
        {1: 2, "kernel_size": 3},
        {("a",): 1},
        {"include": {"a": 1}},
        {"include": {3, 4}},
        {"include": [[[]]]},
        {"exclude": 3.5},
        {"kernel_size": 2**200 + 1},
        {"kernel_size": 3, "depthwise": object()},
        [("kernel_size", 3)],
        "kernel_size",
    ],
)
def test_config_dicts_of_any_shape_raise_only_config_error(data):
    with pytest.raises(clr_timm.ConfigError):
        CLRConfig.from_dict(data)


def test_a_config_nested_deeper_than_repr_goes_is_shown_briefly():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(clr_timm.ConfigError, match="cannot be shown"):
        CLRConfig(include=deep)


def test_keys_of_mixed_types_made_the_old_from_dict_raise_type_error():
    """The weakened copy: the old check of unknown fields sorted keys of mixed types, raising TypeError."""
    data = {1: 2, "rank": 4, "kernel_size": 3}
    known = {"kernel_size"}
    with pytest.raises(TypeError):
        sorted(set(data) - known)
    with pytest.raises(clr_timm.ConfigError, match="unknown CLRConfig field"):
        CLRConfig.from_dict(data)
