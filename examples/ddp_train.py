"""Train a CLR adapter with DistributedDataParallel: one process per GPU (or per CPU slot), launched by torchrun.

One machine, two processes (CPU and gloo here; one process per GPU and nccl on a GPU machine)::

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --out pets.safetensors

Several machines: the same command on every machine, with a shared rendezvous instead of ``--standalone``::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0.example.com:29400 \
        --rdzv_id pets-run-1 examples/ddp_train.py --out pets.safetensors

Without torchrun it runs as a single process on the same global batch, which is how the test checks that DDP trains
the same adapter (``tests/test_ddp.py``). With ``--accelerate``, Hugging Face Accelerate joins the process group and
wraps the model (``accelerator.prepare(model, optimizer)``) instead of the script; launch it the same way (torchrun, as
tested, or ``accelerate launch`` on a machine configured for it).

What makes CLR fit DDP:

- **Only the adapter is synchronised.** ``clr_timm.attach`` leaves ``requires_grad=True`` on the adapter's
  parameters only (CLR kernels, per-task norm affines, head), and DDP builds its gradient buckets from parameters
  that require grad, so the frozen backbone is never all-reduced. Every adapter parameter gets a gradient at every
  step, so ``find_unused_parameters`` stays off (its default). The script checks both on the first step and reports
  them (``"synchronised"`` in the summary line).
- **BatchNorm statistics** (``--bn``), which DDP does not average:

  - ``frozen``: the running statistics keep their pretrained values and normalise in training too
    (``CLRConfig(update_norm_stats=False)``); the affine parameters still train. Nothing depends on how the batch
    is split, so N processes train exactly what one process trains on the global batch. The default.
  - ``local``: each process normalises with its own part of the batch and updates its own running statistics, and
    DDP copies rank 0's statistics to the others before each forward (``broadcast_buffers=True``); the saved
    statistics are rank 0's. The usual DDP behaviour; fine when each process sees a large enough batch.
  - ``sync``: ``SyncBatchNorm`` normalises with the statistics of the global batch and all processes keep the same
    running statistics (the paper's per-task statistics, as one process on the global batch would compute them).
    Needs GPUs (PyTorch's SyncBatchNorm does not run on CPU). The model is converted *before* ``attach``, so CLR
    sees the final norm modules (the state_dict keys stay the same, so the adapter loads into an unconverted model).

- **Saving**: rank 0 writes the adapter of the unwrapped model (``ddp.module``, or ``accelerator.unwrap_model``) with
  ``clr_timm.save_adapter`` (atomic); the others wait for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import clr_timm

BN_MODES = ("frozen", "local", "sync")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet18", help="timm model name (default: resnet18)")
    p.add_argument("--pretrained", action="store_true", help="start from the pretrained backbone (timm weights)")
    p.add_argument("--data", default="synthetic", help="'synthetic', or a task of examples/offline_assets.py")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic data (default: 10)")
    p.add_argument("--train-size", type=int, default=1024, help="synthetic training images (default: 1024)")
    p.add_argument("--image-size", type=int, default=64, help="input side length in pixels (default: 64)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes (default: 64)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: 1e-2)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--bn", choices=BN_MODES, default="frozen", help="BatchNorm statistics (see above; default: frozen)")
    p.add_argument("--variant", default="clr", help="a CLR variant, clr_timm.CLRConfig.preset (default: clr)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl on GPUs, else gloo")
    p.add_argument("--accelerate", action="store_true", help="let Hugging Face Accelerate set up and wrap the model")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="model init, data and shuffling (default: 0)")
    p.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels, to compare runs on GPUs bit for bit"
    )
    p.add_argument("--task", default="task", help="task name recorded in the adapter (default: task)")
    p.add_argument("--out", required=True, help="adapter file to write (rank 0)")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every this many steps (default: 10)")
    return p.parse_args(argv)


@dataclass
class Dist:
    """Where this process sits: its rank among ``world`` processes, and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    accelerator: Any = None  # an accelerate.Accelerator, with --accelerate

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(args: argparse.Namespace) -> Dist:
    """Join the process group when launched by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # One process per GPU. More processes than GPUs share them round-robin, which gloo allows and nccl refuses.
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.accelerate:  # Accelerate reads the same torchrun variables and joins the process group itself
        from accelerate import Accelerator

        acc = Accelerator(cpu=not cuda)
        return Dist(acc.process_index, acc.num_processes, acc.local_process_index, acc.device, acc)
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, device)
    backend = args.backend if args.backend != "auto" else ("nccl" if cuda else "gloo")
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def synthetic_data(n: int, num_classes: int, size: int, seed: int) -> TensorDataset:
    """Images of ``num_classes`` noisy class prototypes: learnable, deterministic, no download."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = 0.5 * prototypes[y] + torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(x, y)


def load_data(args: argparse.Namespace, model_name: str) -> tuple[TensorDataset, TensorDataset, list[str]]:
    """Training and validation sets, and the class names."""
    if args.data == "synthetic":
        train = synthetic_data(args.train_size, args.num_classes, args.image_size, args.seed)
        val = synthetic_data(256, args.num_classes, args.image_size, args.seed + 1)
        return train, val, [f"class-{i}" for i in range(args.num_classes)]
    try:
        from examples import offline_assets
    except ImportError:  # run as a script: its folder is on sys.path
        import offline_assets
    task = offline_assets.load_task(args.data)
    mean, std = offline_assets.input_mean_std(model_name)
    train = offline_assets.tensor_dataset(task.x_train, task.y_train, args.image_size, mean, std)
    val = offline_assets.tensor_dataset(task.x_test, task.y_test, args.image_size, mean, std)
    return train, val, list(task.classes)


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The timm model, SyncBatchNorm if asked for, then CLR attached (only the adapter requires grad)."""
    torch.manual_seed(args.seed)  # the same fresh head on every rank (DDP also broadcasts rank 0's weights)
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes)
    if args.bn == "sync":
        # Before attach: CLR then records the final norm modules. timm's converter also handles BatchNormAct2d.
        model = timm.layers.convert_sync_batchnorm(model)
    config = clr_timm.CLRConfig.preset(args.variant)
    return clr_timm.attach(model, dataclasses.replace(config, update_norm_stats=args.bn != "frozen"))


class BucketCheck:
    """Records what DDP's gradient buckets hold on the first step, through a communication hook.

    ``ddp.register_comm_hook(None, check.hook)``: the hook all-reduces each bucket as DDP's own does (average over the
    processes) and notes its parameters until :meth:`report` is called, which proves that DDP synchronises the
    adapter's parameters and nothing else.
    """

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.buckets = 0
        self.done = False

        def hook(state, bucket):  # DDP checks the annotations of a hook: none, or exactly its own types
            if not self.done:
                self.params += bucket.parameters()
                self.buckets += 1
            return default_hooks.allreduce_hook(state, bucket)

        self.hook = hook

    def report(self, model: nn.Module) -> dict[str, int | bool]:
        self.done = True
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        frozen = {id(p) for p in model.parameters() if not p.requires_grad}
        synced = {id(p) for p in self.params}
        return {
            "buckets": self.buckets,
            "tensors": len(synced),
            "values": sum(p.numel() for p in self.params),
            "frozen_tensors_synchronised": len(synced & frozen),
            "trainable_tensors_not_synchronised": len(trainable - synced),
            "adapter_only": synced == trainable,
        }


def _buffer_sync(sync: bool) -> dict[str, bool]:
    """DDP's option to copy rank 0's buffers to the other ranks before each forward (renamed in newer PyTorch)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": sync}
    return {"broadcast_buffers": sync}


def batches(loader: DataLoader, sampler: DistributedSampler) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches, reshuffled each epoch identically on every rank (``set_epoch``)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, device: torch.device, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    model.train()
    return correct / max(len(data), 1)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train, save the adapter on rank 0, and return (rank 0: print) a JSON-ready summary."""
    args = parse_args(argv)
    if args.deterministic:
        # GPU kernels that accumulate with atomics differ from run to run, and AdamW turns those differences on
        # near-zero gradients into whole steps: needed to compare a DDP run with a single process on a GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    d = setup(args)
    try:
        return train(args, d)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, d: Dist) -> dict[str, object]:
    """The training loop of one process: build, wrap, train, and (rank 0) evaluate and save."""
    if args.bn == "sync" and d.device.type != "cuda":
        raise SystemExit("--bn sync needs GPUs: PyTorch's SyncBatchNorm does not run on CPU. Use --bn frozen or local")
    if args.batch_size % d.world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {d.world} processes")
    train_set, val_set, classes = load_data(args, args.model)
    model = build_model(args, len(classes)).to(d.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    check = BucketCheck()
    net: nn.Module = model
    if d.accelerator is not None:
        net, optimizer = d.accelerator.prepare(model, optimizer)  # DistributedDataParallel when world > 1
    elif d.world > 1:
        net = DistributedDataParallel(
            model,
            device_ids=[d.device.index] if d.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            # frozen: the statistics never change; sync: identical on every rank already; local: rank 0's win.
            **_buffer_sync(args.bn == "local"),
        )
    if isinstance(net, DistributedDataParallel):
        net.register_comm_hook(None, check.hook)
    # Every rank sees its own 1/world of each global batch; one process (world 1) sees the same global batches.
    sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size // d.world, sampler=sampler, drop_last=True)
    net.train()
    losses, synchronised, started = [], None, time.perf_counter()
    stream = batches(loader, sampler)
    for step in range(args.steps):
        x, y = next(stream)
        loss = F.cross_entropy(net(x.to(d.device)), y.to(d.device))
        optimizer.zero_grad(set_to_none=True)
        if d.accelerator is not None:
            d.accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        if step == 0 and d.world > 1:
            synchronised = check.report(model)
        global_loss = loss.detach().clone()
        if d.world > 1:  # for the log only: the mean loss over the global batch (gloo has no ReduceOp.AVG)
            dist.all_reduce(global_loss)
            global_loss /= d.world
        losses.append(global_loss.item())
        if d.main and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    summary: dict[str, object] = {
        "world_size": d.world,
        "device": str(d.device),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "bn": args.bn,
        "variant": args.variant,
        "accelerate": d.accelerator is not None,
        "steps": args.steps,
        "global_batch": args.batch_size,
        "trainable_tensors": len(trainable),
        "frozen_tensors": sum(1 for p in model.parameters() if not p.requires_grad),
        "synchronised": synchronised,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if d.main:
        summary["val_accuracy"] = accuracy(model, val_set, d.device)
        clr_timm.save_adapter(model, args.out, task=args.task, label_names=classes)
        summary["out"] = str(args.out)
        print(json.dumps(summary), flush=True)
    if d.world > 1:
        dist.barrier()  # the others leave once the adapter is on disk
    return summary


if __name__ == "__main__":
    main()
