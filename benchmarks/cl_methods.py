"""The paper's continual-learning baselines, each written from its paper, on a shared timm backbone.

Task-incremental setting: one backbone is trained on each task in turn, every task has its own linear head, and the
task id picks the head at test time. Each method is a :class:`Strategy`: it may add to the loss of a batch, watch the
optimizer step, and do work before and after each task; :func:`examples.continual.train_task` runs the shared recipe
(same batches, augmentation, optimizer, schedule and seed as CLR) around it.

- :class:`Strategy` itself: sequential fine-tuning, no protection (the lower bound).
- :class:`EWC` (Kirkpatrick et al., PNAS 2017): a quadratic penalty per past task, weighted by the diagonal Fisher
  information at that task's solution. ``online=True``: online EWC (Schwarz et al., ICML 2018, "Progress & Compress"),
  one running Fisher (decayed by ``gamma``) and one anchor, the latest solution.
- :class:`SI` (Zenke et al., ICML 2017): Synaptic Intelligence, a per-parameter importance accumulated along the
  training path (the gradient times each update) and normalised by the parameter's total change.
- :class:`LwF` (Li & Hoiem, ECCV 2016 / TPAMI 2017): Learning without Forgetting, knowledge distillation (temperature
  2) of the previous model's old-head outputs on the new task's images.
- :class:`ER` (Chaudhry et al., 2019, "On Tiny Episodic Memories in Continual Learning"): a fixed memory of
  ``per_task`` training images per past task, replayed in every step alongside the new batch.
- :class:`DERpp` (Buzzega et al., NeurIPS 2020): Dark Experience Replay++, a reservoir memory of images with the
  logits they had when stored; replay matches those logits (MSE, ``alpha``) and the labels (``beta``).
- :class:`SupSup` (Wortsman et al., NeurIPS 2020): Supermasks in Superposition with the task id given (their GG
  setting): a binary mask per task over the frozen pretrained weights, learned with edge-popup's straight-through
  top-k scores. Parameter isolation: the weights never change, so nothing is forgotten; a task costs one bit per
  weight.

PSP (Cheung et al., NeurIPS 2019) is left out: it multiplies every layer's input by a random per-task +-1 context
key, which on a pretrained backbone scrambles the features the first layer hands on for every task; it is meant for
networks trained in superposition from scratch. SupSup is the parameter-isolation method that keeps a pretrained
backbone intact, which is also CLR's premise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["DERpp", "ER", "EWC", "LwF", "MultiHeadNet", "SI", "Strategy", "SupSup", "tensor_bytes"]


def tensor_bytes(tensors: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> int:
    """Bytes held by ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


class MultiHeadNet(nn.Module):
    """A timm backbone (its classifier removed) shared by every task, and one linear head per task.

    ``net(x)`` uses the current task's head (:attr:`task`); ``net.logits(features, task)`` applies any task's head
    to features from :attr:`backbone`.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(base)
        self.backbone.reset_classifier(0)
        self.heads = nn.ModuleDict()
        self.task: str | None = None

    def add_head(self, task: str, num_classes: int) -> None:
        """A new head for ``task`` (initialised as timm initialises a classifier), made current."""
        self.heads[task] = nn.Linear(self.backbone.num_features, num_classes)
        self.task = task

    def logits(self, features: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task is None:
            raise RuntimeError("no task set: call add_head or set .task")
        return self.heads[self.task](self.backbone(x))


class Strategy:
    """Sequential fine-tuning of the shared backbone: the base every other method builds on.

    Args:
        label_smoothing: Of the task's cross-entropy (the recipe's).
        train_mode: Train in train mode, BatchNorm running statistics updating (shared by all tasks, so each task
            overwrites them, and no weight penalty protects them); False: eval mode, the pretrained statistics
            kept, as CLR's recipe keeps them.
    """

    name = "sequential"

    def __init__(self, *, label_smoothing: float = 0.0, train_mode: bool = True) -> None:
        self.label_smoothing = label_smoothing
        self.train_mode = train_mode
        self.net: MultiHeadNet | None = None
        self.task_index = 0

    def setup(self, net: MultiHeadNet) -> None:
        """Called once, before the first task."""
        self.net = net

    def before_task(self, task: str, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called after the task's head exists and before its first step."""
        self.task_index = index

    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def loss(self, x_aug: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The loss of one batch (``x_aug``: augmented images, ``x``: the same before augmentation)."""
        return self.ce(self.net(x_aug), y)

    def around_step(self, step: Callable[[], None]) -> None:
        step()

    def after_task(self, task: str, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called after the task's last step (still before it is evaluated)."""

    def set_eval_task(self, task: str) -> None:
        """Make ``task`` the one the network computes (its head; :class:`SupSup` also its mask)."""
        self.net.task = task

    def extra_state_bytes(self) -> int:
        """Bytes the method holds while it trains, beyond the network, its heads and the optimizer (Fisher and
        anchors, importances, the previous model, mask scores); replayed examples are counted apart."""
        return 0

    def replay_bytes(self) -> int:
        """Bytes of stored training examples (images, labels, logits)."""
        return 0

    def per_task_stored_bytes(self) -> int:
        """Bytes each task adds to what is kept for inference (heads apart)."""
        return 0

    def backbone_params(self) -> list[nn.Parameter]:
        return [p for p in self.net.backbone.parameters() if p.requires_grad]


class _Quadratic(Strategy):
    """A penalty ``strength/2 * sum(importance * (theta - anchor)^2)`` over anchors kept by subclasses."""

    def __init__(self, strength: float, **kw) -> None:
        super().__init__(**kw)
        self.strength = strength
        self.anchors: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (importance, anchor) pairs

    def penalty(self) -> torch.Tensor:
        params = self.backbone_params()
        total = params[0].new_zeros(())
        for importance, anchor in self.anchors:
            for p, w, a in zip(params, importance, anchor, strict=True):
                total = total + (w * (p - a).square()).sum()
        return 0.5 * self.strength * total

    def loss(self, x_aug, y, x):
        loss = super().loss(x_aug, y, x)
        return loss + self.penalty() if self.anchors else loss

    def extra_state_bytes(self) -> int:
        return sum(tensor_bytes(w) + tensor_bytes(a) for w, a in self.anchors)


class EWC(_Quadratic):
    """Elastic Weight Consolidation; ``online=True``: online EWC.

    Args:
        strength: lambda, the penalty's weight.
        online: One running Fisher and one anchor (the latest solution) instead of one pair per past task.
        gamma: Online EWC's decay of the running Fisher.
        fisher_samples: Training images the diagonal Fisher is estimated on (one gradient each: the empirical Fisher,
            labels as given).
    """

    def __init__(
        self, strength: float, *, online: bool = False, gamma: float = 1.0, fisher_samples: int = 200, **kw
    ) -> None:
        super().__init__(strength, **kw)
        self.online = online
        self.gamma = gamma
        self.fisher_samples = fisher_samples
        self.name = "oewc" if online else "ewc"

    def fisher(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Mean squared per-example gradient of the log-likelihood (eval mode: the statistics the task is tested in)."""
        params = self.backbone_params()
        fisher = [torch.zeros_like(p) for p in params]
        was_training = self.net.training
        self.net.eval()
        n = min(self.fisher_samples, len(x))
        for i in range(n):
            loss = F.cross_entropy(self.net(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads, strict=True):
                if g is not None:
                    f.add_(g.square())
        self.net.train(was_training)
        return [f / n for f in fisher]

    def after_task(self, task, index, x, y):
        fisher = self.fisher(x, y)
        anchor = [p.detach().clone() for p in self.backbone_params()]
        if self.online and self.anchors:
            running, _ = self.anchors[0]
            fisher = [self.gamma * r + f for r, f in zip(running, fisher, strict=True)]
            self.anchors = [(fisher, anchor)]
        else:
            self.anchors.append((fisher, anchor))


class SI(_Quadratic):
    """Synaptic Intelligence.

    Args:
        strength: c, the penalty's weight (the penalty is ``c * sum(Omega * (theta - anchor)^2)``).
        damping: xi, added to the squared total change of each parameter.
    """

    name = "si"

    def __init__(self, strength: float, *, damping: float = 0.1, **kw) -> None:
        super().__init__(2.0 * strength, **kw)  # _Quadratic halves it
        self.damping = damping
        self.omega: list[torch.Tensor] = []
        self.start: list[torch.Tensor] = []
        self.importance: list[torch.Tensor] | None = None

    def before_task(self, task, index, x, y):
        super().before_task(task, index, x, y)
        params = self.backbone_params()
        self.start = [p.detach().clone() for p in params]
        self.omega = [torch.zeros_like(p) for p in params]

    def around_step(self, step):
        params = self.backbone_params()
        before = [p.detach().clone() for p in params]
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        step()
        with torch.no_grad():
            for w, p, b, g in zip(self.omega, params, before, grads, strict=True):
                if g is not None:
                    w.sub_(g * (p - b))  # -gradient x update: the loss decrease this parameter is responsible for

    def after_task(self, task, index, x, y):
        params = self.backbone_params()
        with torch.no_grad():
            gained = [
                (w / ((p - s).square() + self.damping)).clamp_(min=0)
                for w, p, s in zip(self.omega, params, self.start, strict=True)
            ]
        self.importance = gained if self.importance is None else [a + g for a, g in zip(self.importance, gained)]
        self.anchors = [(self.importance, [p.detach().clone() for p in params])]

    def extra_state_bytes(self) -> int:
        return super().extra_state_bytes() + tensor_bytes(self.omega)  # start == the anchor: not counted twice


class LwF(Strategy):
    """Learning without Forgetting: distil the previous model's outputs of every old head on the new images.

    Args:
        strength: lambda_o, the weight of the distillation term (1 in the paper).
        temperature: T (2 in the paper).
    """

    name = "lwf"

    def __init__(self, strength: float = 1.0, *, temperature: float = 2.0, **kw) -> None:
        super().__init__(**kw)
        self.strength = strength
        self.temperature = temperature
        self.old: MultiHeadNet | None = None
        self.old_tasks: list[str] = []

    def before_task(self, task, index, x, y):
        super().before_task(task, index, x, y)
        self.old_tasks = [t for t in self.net.heads if t != task]
        self.old = None
        if self.old_tasks:
            self.old = copy.deepcopy(self.net).eval().requires_grad_(False)

    def loss(self, x_aug, y, x):
        features = self.net.backbone(x_aug)
        loss = self.ce(self.net.logits(features, self.net.task), y)
        if self.old is None:
            return loss
        with torch.no_grad():
            old_features = self.old.backbone(x_aug)
        t = self.temperature
        for task in self.old_tasks:
            target = F.softmax(self.old.logits(old_features, task) / t, dim=1)
            log_p = F.log_softmax(self.net.logits(features, task) / t, dim=1)
            loss = loss + self.strength * -(target * log_p).sum(1).mean()
        return loss

    def after_task(self, task, index, x, y):
        self.old = None

    def extra_state_bytes(self) -> int:
        return tensor_bytes(list(self.net.state_dict().values()))  # the frozen previous model (from the 2nd task)


class _Memory:
    """Stored examples: images (before augmentation), labels, task names, optionally logits."""

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.task: list[str] = []
        self.logits: list[torch.Tensor | None] = []

    def __len__(self) -> int:
        return len(self.x)

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        return torch.randint(len(self), (n,), generator=generator).tolist()

    def bytes(self) -> int:
        return tensor_bytes(self.x) + tensor_bytes(self.y) + tensor_bytes([t for t in self.logits if t is not None])


def _per_task(
    net: MultiHeadNet,
    features: torch.Tensor,
    tasks: Sequence[str],
    loss: Callable[[torch.Tensor, list[int]], torch.Tensor],
) -> torch.Tensor:
    """Mean over rows of ``loss(logits, rows)``, each group of rows through its own task's head (heads differ in size).

    ``loss`` gets one task's logits and the row indices they came from, and returns the summed loss of those rows.
    """
    total = features.new_zeros(())
    for task in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        total = total + loss(net.logits(features[rows], task), rows)
    return total / len(tasks)


class ER(Strategy):
    """Experience replay with a fixed memory of ``per_task`` images per past task (class-balanced random choice).

    Each step concatenates a replay batch (``batch_size`` images drawn uniformly from the memory, augmented like the
    new ones) to the new batch; the loss is the new batch's cross-entropy plus the replayed one's, each through its
    own task's head.

    Args:
        per_task: Images kept from each task.
        batch_size: Replayed images per step.
        augment: The recipe's augmentation, applied to replayed images.
        seed: Seed of the memory choice and the replay draws.
    """

    name = "er"

    def __init__(
        self,
        per_task: int,
        batch_size: int,
        *,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        seed: int = 0,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self.per_task = per_task
        self.batch_size = batch_size
        self.augment = augment
        self.memory = _Memory()
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
        idx = self.memory.sample(self.batch_size, self.generator)
        x = torch.stack([self.memory.x[i] for i in idx])
        if self.augment is not None:
            x = self.augment(x, self.generator)
        return x, torch.stack([self.memory.y[i] for i in idx]), [self.memory.task[i] for i in idx], idx

    def loss(self, x_aug, y, x):
        if not len(self.memory):
            return super().loss(x_aug, y, x)
        xm, ym, tm, _ = self._draw()
        features = self.net.backbone(torch.cat([x_aug, xm]))
        n = len(x_aug)
        replay = _per_task(self.net, features[n:], tm, self._ce_sum(ym))
        return self.ce(self.net.logits(features[:n], self.net.task), y) + replay

    def _ce_sum(self, y: torch.Tensor) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
        return lambda logits, rows: self.ce(logits, y[rows]) * len(rows)

    def after_task(self, task, index, x, y):
        keep = _balanced_choice(y, self.per_task, self.generator)
        for i in keep:
            self.memory.x.append(x[i].clone())
            self.memory.y.append(y[i].clone())
            self.memory.task.append(task)
            self.memory.logits.append(None)

    def replay_bytes(self) -> int:
        return self.memory.bytes()


def _balanced_choice(y: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """``k`` indices of ``y``, spread over its classes as evenly as they allow, in random order."""
    per_class = [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
    per_class = [m[torch.randperm(len(m), generator=generator)].tolist() for m in per_class]
    chosen: list[int] = []
    while len(chosen) < min(k, len(y)):
        for members in per_class:
            if members and len(chosen) < k:
                chosen.append(members.pop())
    return chosen


class DERpp(ER):
    """Dark Experience Replay++ with ``per_task`` slots per task, filled by reservoir sampling over the task's stream.

    Loss: new cross-entropy ``+ alpha * MSE(logits now, logits stored)`` on one replay batch ``+ beta *
    cross-entropy`` on another (both drawn from the whole memory, the current task's slots included, as in the
    paper). The stored logits are the current head's outputs on the augmented image at the step it was stored.
    """

    name = "derpp"

    def __init__(self, per_task: int, batch_size: int, *, alpha: float = 0.1, beta: float = 0.5, **kw) -> None:
        super().__init__(per_task, batch_size, **kw)
        self.alpha = alpha
        self.beta = beta
        self.seen = 0
        self.slots: list[int] = []

    def before_task(self, task, index, x, y):
        super().before_task(task, index, x, y)
        self.seen = 0
        self.slots = []

    def loss(self, x_aug, y, x):
        n = len(x_aug)
        if len(self.memory):
            x1, _, t1, i1 = self._draw()
            x2, y2, t2, _ = self._draw()
            features = self.net.backbone(torch.cat([x_aug, x1, x2]))
            m = n + len(x1)
        else:
            features = self.net.backbone(x_aug)
        logits = self.net.logits(features[:n], self.net.task)
        loss = self.ce(logits, y)
        if len(self.memory):
            stored = [self.memory.logits[i] for i in i1]

            def mse_sum(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
                target = torch.stack([stored[r] for r in rows])
                return F.mse_loss(logits, target, reduction="sum") / logits.shape[1]

            mse = _per_task(self.net, features[n:m], t1, mse_sum)
            ce = _per_task(self.net, features[m:], t2, self._ce_sum(y2))
            loss = loss + self.alpha * mse + self.beta * ce
        self._reservoir(x, y, logits.detach())
        return loss

    def _reservoir(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        for i in range(len(x)):
            if len(self.slots) < self.per_task:
                slot = len(self.memory)
                self.memory.x.append(x[i].clone())
                self.memory.y.append(y[i].clone())
                self.memory.task.append(self.net.task)
                self.memory.logits.append(logits[i].clone())
                self.slots.append(slot)
            else:
                j = int(torch.randint(self.seen + 1, (1,), generator=self.generator))
                if j < self.per_task:
                    slot = self.slots[j]
                    self.memory.x[slot] = x[i].clone()
                    self.memory.y[slot] = y[i].clone()
                    self.memory.logits[slot] = logits[i].clone()
            self.seen += 1

    def after_task(self, task, index, x, y):
        pass  # the reservoir filled the task's slots during training


class _TopKMask(torch.autograd.Function):
    """Edge-popup's mask: 1 for the top ``density`` share of scores, 0 elsewhere; gradient passed straight through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, density: float) -> torch.Tensor:
        k = max(1, round(density * scores.numel()))
        flat = scores.flatten()
        threshold = flat.kthvalue(flat.numel() - k + 1).values
        return (scores >= threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Supermask(nn.Module):
    """``weight * mask``: the mask from trainable scores (training) or a stored task's boolean mask."""

    def __init__(self, weight: torch.Tensor, density: float) -> None:
        super().__init__()
        self.density = density
        self.scores = nn.Parameter(weight.detach().abs().clone())
        self.fixed: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.fixed if self.fixed is not None else _TopKMask.apply(self.scores, self.density)
        return weight * mask


class SupSup(Strategy):
    """Supermasks in Superposition (task id given): a learned binary mask per task over frozen pretrained weights.

    Every conv and linear weight of the backbone is masked; scores start at the weights' magnitudes (so a task starts
    from the magnitude-pruned network, not a random subnetwork: the backbone is pretrained here, unlike the paper's
    random one) and train with edge-popup's straight-through top-k. Only the scores and the head train; a task stores
    its mask as bits. A mask changes every layer's activation statistics, so by default each task also re-estimates
    and keeps its own BatchNorm statistics (from the pretrained ones; affines stay frozen): without that, a 50% mask
    left the first task of our sequence at chance.

    Args:
        density: Share of each layer's weights a mask keeps.
        task_norm_stats: Per-task BatchNorm running statistics (False: the pretrained ones, eval mode throughout).
    """

    name = "supsup"

    def __init__(self, density: float = 0.5, *, task_norm_stats: bool = True, **kw) -> None:
        super().__init__(**{**kw, "train_mode": task_norm_stats})
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.density = density
        self.masks: dict[str, list[torch.Tensor]] = {}
        self.stats: dict[str, list[torch.Tensor]] = {}
        self.layers: list[tuple[nn.Module, _Supermask]] = []
        self.pretrained_stats: list[torch.Tensor] = []

    def setup(self, net):
        super().setup(net)
        net.backbone.requires_grad_(False)
        for m in list(net.backbone.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)) and "weight" in m._parameters:
                sm = _Supermask(m.weight, self.density)
                parametrize.register_parametrization(m, "weight", sm, unsafe=True)
                self.layers.append((m, sm))
        self.pretrained_stats = [b.clone() for b in self._norm_stats()]

    def _norm_stats(self) -> list[torch.Tensor]:
        return [
            b
            for m in self.net.backbone.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var)
            if b is not None
        ]

    def before_task(self, task, index, x, y):
        super().before_task(task, index, x, y)
        for module, sm in self.layers:
            sm.scores = nn.Parameter(module.parametrizations.weight.original.detach().abs().clone())
            sm.fixed = None
        with torch.no_grad():
            for b, p in zip(self._norm_stats(), self.pretrained_stats, strict=True):
                b.copy_(p)

    def after_task(self, task, index, x, y):
        with torch.no_grad():
            self.masks[task] = [_TopKMask.apply(sm.scores, sm.density).bool() for _, sm in self.layers]
        if self.train_mode:
            self.stats[task] = [b.clone() for b in self._norm_stats()]
        for _, sm in self.layers:
            sm.scores.requires_grad_(False)

    def set_eval_task(self, task):
        super().set_eval_task(task)
        if task in self.masks:
            for (_, sm), mask in zip(self.layers, self.masks[task], strict=True):
                sm.fixed = mask.to(sm.scores.dtype)
        if task in self.stats:
            with torch.no_grad():
                for b, saved in zip(self._norm_stats(), self.stats[task], strict=True):
                    b.copy_(saved)

    def mask_bits(self) -> int:
        return sum(sm.scores.numel() for _, sm in self.layers)

    def per_task_stored_values(self) -> int:
        """Float values a task keeps besides its mask and head: its BatchNorm statistics (0 when frozen)."""
        return sum(t.numel() for t in self.pretrained_stats) if self.train_mode else 0

    def per_task_stored_bytes(self) -> int:
        stats = tensor_bytes(self.pretrained_stats) if self.train_mode else 0
        return math.ceil(self.mask_bits() / 8) + stats

    def extra_state_bytes(self) -> int:
        return tensor_bytes([sm.scores for _, sm in self.layers])  # float scores, one per weight, while training
