"""clr_timm: Channel-wise Lightweight Reprogramming (Ge et al., ICCV 2023) for every timm CNN.

One frozen backbone serves many tasks; each task owns a tiny adapter (depthwise reprogramming kernels after every
conv larger than 1x1, its normalisation layers and its head) that never touches another task's.

The top level holds what a training script, a serving script and a new layer kind need. Everything else stays
importable from its module: the built-in layers (``clr_timm.layers.CLRConv2d``, ``CLRScale``), the file format
(``clr_timm.adapter``: ``AdapterFile``, ``ADAPTER_FILE``, ``backbone_fingerprint``), the Hub's specific errors
(``clr_timm.errors``), an attached model's config (``clr_timm.attach.get_config``), timm checkpoints
(``clr_timm.checkpoint.extract_adapter``, the twin of ``clr-timm extract``), the task oracles
(``clr_timm.multitask.EntropyOracle``), ``clr_timm.count.ParameterCount`` and the HTTP server (``clr_timm.serve``, an
optional extra). See ARCHITECTURE.md for the layers of the package.
"""

from .adapter import read_adapter
from .attach import (
    adapter_state_dict,
    attach,
    detach,
    is_attached,
    mark_only_adapter_as_trainable,
    plan_targets,
    reset_adapter,
    resize_head,
)
from .config import CLRConfig
from .count import count_parameters, print_trainable_parameters
from .errors import AdapterError, AdapterMismatchError, BackboneMismatchError, CLRError, ConfigError, HubError
from .factory import create_model
from .fuse import fuse, is_fused, unfuse
from .hub import describe, download_adapter, list_tasks, push_folder
from .layers import ReprogrammingLayer, register_layer
from .memory import is_memory_efficient, set_memory_efficient
from .multitask import MultiTaskModel
from .onnx_export import export_onnx
from .save_load import load_adapter, push_to_hub, save_adapter, save_pretrained
from .version import __version__

__all__ = [
    "__version__",
    # attaching and training
    "CLRConfig",
    "attach",
    "detach",
    "is_attached",
    "plan_targets",
    "reset_adapter",
    "resize_head",
    "mark_only_adapter_as_trainable",
    "adapter_state_dict",
    "count_parameters",
    "print_trainable_parameters",
    "set_memory_efficient",
    "is_memory_efficient",
    # one task's adapter: files and the Hub
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "save_pretrained",
    "push_to_hub",
    "push_folder",
    "list_tasks",
    "download_adapter",
    "describe",
    "create_model",
    # serving
    "fuse",
    "unfuse",
    "is_fused",
    "MultiTaskModel",
    "export_onnx",
    # new reprogramming-layer kinds
    "ReprogrammingLayer",
    "register_layer",
    # errors (the Hub's specific ones: clr_timm.errors)
    "CLRError",
    "ConfigError",
    "AdapterError",
    "AdapterMismatchError",
    "BackboneMismatchError",
    "HubError",
]
