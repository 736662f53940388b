"""clr_timm: Channel-wise Lightweight Reprogramming (Ge et al., ICCV 2023) for every timm CNN.

One frozen backbone serves many tasks; each task owns a tiny adapter (depthwise reprogramming kernels after every
conv larger than 1x1, its normalisation layers and its head) that never touches another task's.
"""

from .adapter import ADAPTER_FILE, AdapterFile, backbone_fingerprint, load_adapter, read_adapter, save_adapter
from .attach import (
    adapter_state_dict,
    attach,
    detach,
    get_config,
    is_attached,
    mark_only_adapter_as_trainable,
    plan_targets,
    reset_adapter,
    resize_head,
)
from .config import CLRConfig
from .count import ParameterCount, count_parameters, print_trainable_parameters
from .errors import AdapterError, AdapterMismatchError, BackboneMismatchError, CLRError, ConfigError
from .fuse import fuse, is_fused, unfuse
from .hub import (
    HubAuthError,
    HubError,
    HubOfflineError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    TaskNotFoundError,
    describe,
    download_adapter,
    list_tasks,
    push_folder,
    push_to_hub,
    save_pretrained,
)
from .layers import CLRConv2d, CLRScale
from .memory import is_memory_efficient, set_memory_efficient
from .multitask import EntropyOracle, MultiTaskModel, TaskOracle
from .version import __version__

__all__ = [
    "__version__",
    "CLRConfig",
    "CLRConv2d",
    "CLRScale",
    "attach",
    "detach",
    "is_attached",
    "get_config",
    "reset_adapter",
    "resize_head",
    "mark_only_adapter_as_trainable",
    "adapter_state_dict",
    "plan_targets",
    "count_parameters",
    "print_trainable_parameters",
    "ParameterCount",
    "fuse",
    "unfuse",
    "is_fused",
    "set_memory_efficient",
    "is_memory_efficient",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "backbone_fingerprint",
    "AdapterFile",
    "ADAPTER_FILE",
    "save_pretrained",
    "push_to_hub",
    "push_folder",
    "list_tasks",
    "download_adapter",
    "describe",
    "MultiTaskModel",
    "EntropyOracle",
    "TaskOracle",
    "CLRError",
    "ConfigError",
    "AdapterError",
    "AdapterMismatchError",
    "BackboneMismatchError",
    "HubError",
    "HubRepoNotFoundError",
    "HubAuthError",
    "HubRevisionNotFoundError",
    "TaskNotFoundError",
    "HubOfflineError",
]
