"""The continual-learning baselines of benchmarks/cl_methods.py do what their papers define, on a real timm model.

A tiny random-init timm EfficientNet at 32 px: the weights do not matter for these checks, only the arithmetic.
"""

import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from benchmarks import cl_methods as cl
from benchmarks import continual_baselines as cb
from examples.continual import PreparedTask, random_affine


def _base():
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=10).eval()


def _task(name, n=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % classes
    return PreparedTask(name, [str(c) for c in range(classes)], x, y, x[:6].clone(), y[:6].clone())


def _start(strategy, tasks):
    net = cl.MultiHeadNet(_base())
    strategy.setup(net)
    return net


def _learn(strategy, net, task, index, steps=2, lr=1e-2):
    """A few plain optimizer steps through the strategy's hooks (what train_task does)."""
    net.add_head(task.name, task.num_classes)
    strategy.before_task(task.name, index, task.x_train, task.y_train)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train(strategy.train_mode)
    for _ in range(steps):
        loss = strategy.loss(task.x_train, task.y_train, task.x_train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        strategy.around_step(opt.step)
    strategy.after_task(task.name, index, task.x_train, task.y_train)
    net.eval()


def test_backward_transfer_and_forgetting_from_a_hand_matrix():
    m = [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.75, 0.5]]
    assert cb.backward_transfer(m) == pytest.approx(((0.6 - 0.9) + (0.75 - 0.7)) / 2)
    assert cb.backward_transfer([[0.5]]) == 0.0


def test_ewc_fisher_is_the_mean_squared_per_example_gradient_and_the_penalty_its_quadratic():
    a, b = _task("a"), _task("b", seed=1)
    ewc = cl.EWC(10.0, fisher_samples=5)
    net = _start(ewc, [a, b])
    _learn(ewc, net, a, 0)
    ((fisher, _anchor),) = ewc.anchors
    params = ewc.backbone_params()
    expected = [torch.zeros_like(p) for p in params]
    for i in range(5):
        grads = torch.autograd.grad(F.cross_entropy(net(a.x_train[i : i + 1]), a.y_train[i : i + 1]), params)
        for e, g in zip(expected, grads):
            e.add_(g.square() / 5)
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f, e)
    assert ewc.penalty().item() == 0.0  # at the anchor
    with torch.no_grad():
        params[0].add_(0.1)
    manual = 0.5 * 10.0 * (fisher[0] * 0.01).sum()
    torch.testing.assert_close(ewc.penalty(), manual, rtol=1e-4, atol=1e-7)
    _learn(ewc, net, b, 1)
    assert len(ewc.anchors) == 2  # one (Fisher, anchor) pair per past task


def test_online_ewc_keeps_one_running_fisher_and_the_latest_anchor():
    a, b = _task("a"), _task("b", seed=1)
    oewc = cl.EWC(10.0, online=True, gamma=0.5, fisher_samples=4)
    net = _start(oewc, [a, b])
    _learn(oewc, net, a, 0)
    first = [f.clone() for f in oewc.anchors[0][0]]
    _learn(oewc, net, b, 1)
    assert len(oewc.anchors) == 1
    fisher_b = oewc.fisher(b.x_train, b.y_train)
    for running, f1, f2 in zip(oewc.anchors[0][0], first, fisher_b):
        torch.testing.assert_close(running, 0.5 * f1 + f2)
    for anchor, p in zip(oewc.anchors[0][1], oewc.backbone_params()):
        assert torch.equal(anchor, p.detach())


def test_si_path_integral_is_minus_gradient_times_update():
    a = _task("a")
    si = cl.SI(1.0, damping=0.1)
    net = _start(si, [a])
    net.add_head("a", 3)
    si.before_task("a", 0, a.x_train, a.y_train)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    net.train()
    loss = si.loss(a.x_train, a.y_train, a.x_train)
    loss.backward()
    grads = [p.grad.clone() for p in si.backbone_params()]
    si.around_step(opt.step)
    for w, g in zip(si.omega, grads):  # plain SGD: the update is -lr * g, so omega = lr * g^2
        torch.testing.assert_close(w, 0.05 * g.square(), rtol=1e-4, atol=1e-9)
    si.after_task("a", 0, a.x_train, a.y_train)
    for imp, w, p, s in zip(si.importance, si.omega, si.backbone_params(), si.start):
        torch.testing.assert_close(imp, (w / ((p.detach() - s).square() + 0.1)).clamp(min=0))


def test_lwf_distillation_is_the_old_models_soft_target_cross_entropy():
    a, b = _task("a"), _task("b", seed=1)
    lwf = cl.LwF(2.0, temperature=2.0)
    net = _start(lwf, [a, b])
    _learn(lwf, net, a, 0)
    net.add_head("b", 3)
    lwf.before_task("b", 1, b.x_train, b.y_train)
    net.eval()  # same statistics as the frozen copy: the new model still equals the old one
    loss = lwf.loss(b.x_train, b.y_train, b.x_train)
    features = net.backbone(b.x_train)
    soft = F.softmax(net.logits(features, "a") / 2.0, 1)
    entropy = -(soft * soft.log()).sum(1).mean()
    ce = F.cross_entropy(net.logits(features, "b"), b.y_train)
    torch.testing.assert_close(loss, ce + 2.0 * entropy, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for p in lwf.old.parameters())


def test_er_memory_is_class_balanced_per_task_and_replay_trains_the_old_heads():
    a, b = _task("a", n=30), _task("b", n=30, seed=1)
    er = cl.ER(6, 8, augment=random_affine, seed=0)
    net = _start(er, [a, b])
    _learn(er, net, a, 0)
    assert len(er.memory) == 6 and set(er.memory.task) == {"a"}
    assert sorted(int(y) for y in er.memory.y) == [0, 0, 1, 1, 2, 2]
    assert all(any(torch.equal(x, row) for row in a.x_train) for x in er.memory.x)
    net.add_head("b", 3)
    er.before_task("b", 1, b.x_train, b.y_train)
    net.train()
    er.loss(b.x_train, b.y_train, b.x_train).backward()
    assert net.heads["a"].weight.grad is not None and net.heads["a"].weight.grad.abs().sum() > 0
    assert er.replay_bytes() == 6 * (3 * 32 * 32 * 4 + 8)


def test_derpp_reservoir_keeps_per_task_slots_with_the_logits_of_the_moment():
    a, b = _task("a", n=20), _task("b", n=20, seed=1)
    der = cl.DERpp(5, 4, seed=0)
    net = _start(der, [a, b])
    net.add_head("a", 3)
    der.before_task("a", 0, a.x_train, a.y_train)
    net.eval()
    der.loss(a.x_train, a.y_train, a.x_train)  # no memory yet: fills the reservoir
    assert len(der.memory) == 5 and der.seen == 20
    with torch.no_grad():
        logits = net(a.x_train)
    for x, stored in zip(der.memory.x, der.memory.logits):
        row = next(i for i in range(20) if torch.equal(a.x_train[i], x))
        torch.testing.assert_close(stored, logits[row])
    der.after_task("a", 0, a.x_train, a.y_train)
    _learn(der, net, b, 1)
    assert len(der.memory) == 10 and der.memory.task.count("a") == 5 and der.memory.task.count("b") == 5


def test_supsup_starts_as_the_pretrained_network_and_never_forgets():
    a, b = _task("a"), _task("b", seed=1)
    full = cl.SupSup(density=1.0)
    net = _start(full, [a])
    plain = copy.deepcopy(net.backbone)
    net.add_head("a", 3)
    full.before_task("a", 0, a.x_train, a.y_train)
    assert torch.equal(net.backbone(a.x_test), _unparametrized(plain)(a.x_test))

    sup = cl.SupSup(density=0.5)
    net = _start(sup, [a, b])
    weights = {k: v.clone() for k, v in net.backbone.state_dict().items() if k.endswith("original")}
    _learn(sup, net, a, 0, steps=3, lr=100.0)  # score gradients are tiny at random init
    sup.set_eval_task("a")
    before = net(a.x_test)
    _learn(sup, net, b, 1, steps=3, lr=100.0)
    sup.set_eval_task("a")
    assert torch.equal(net(a.x_test), before)  # task a's mask and head are untouched by task b
    for k, v in net.backbone.state_dict().items():
        if k.endswith("original"):
            assert torch.equal(v, weights[k])  # the pretrained weights never change
    assert sup.stats["a"] and not all(torch.equal(a, b) for a, b in zip(sup.stats["a"], sup.stats["b"]))
    for mask in sup.masks["a"]:
        assert mask.dtype == torch.bool
        if mask.numel() >= 100:
            assert abs(mask.float().mean().item() - 0.5) < 0.02
    stats = sum(t.numel() * t.element_size() for t in sup.stats["a"])  # its own BatchNorm statistics
    assert sup.per_task_stored_bytes() == math.ceil(sup.mask_bits() / 8) + stats
    magnitude = [cl._TopKMask.apply(w.abs(), 0.5).bool() for w in weights.values()]
    assert len(magnitude) == len(sup.masks["a"])
    assert any(not torch.equal(m, s) for m, s in zip(magnitude, sup.masks["a"]))  # the scores trained


def _unparametrized(module):
    from torch.nn.utils import parametrize

    module = copy.deepcopy(module)
    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    return module


def test_supsup_rejects_a_density_outside_0_1():
    with pytest.raises(ValueError, match="density"):
        cl.SupSup(density=0.0)


def test_method_groups_expand_and_unknown_methods_are_named():
    args = cb.parse_args(["--methods", "cl", "lora", "--tasks", "uci_digits"])
    assert args.methods[: len(cb.GROUPS["cl"])] == cb.GROUPS["cl"] and args.methods[-1] == "lora"
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        cb.parse_args(["--methods", "nope", "--tasks", "uci_digits"])


def test_benchmark_runs_every_cl_method_and_plots_task_one(tmp_path):
    threads = torch.get_num_threads()
    try:
        argv = "--tasks uci_digits lfw_faces --methods cl --seeds 0 --epochs 1 --image-size 32 --max-train 24 "
        argv += "--max-test 12 --batch-size 8 --threads 1 --no-progress --out"
        results = cb.main([*argv.split(), str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    keys = [r.key for r in results]
    n = len(cb.GROUPS["cl"])
    assert keys == cb.GROUPS["cl"] and [r.seed for r in results] == [0] * n
    by = {(r.key, r.seed): r for r in results}
    for key in ("clr", "probe", "full", "supsup", "supsup_frozen_bn"):
        assert by[key, 0].forgetting == 0.0 and by[key, 0].matrix[1][0] == by[key, 0].matrix[0][0]
    images = sum(min(50, n) for n in (24, 24))  # ER keeps up to 50 training images per task
    assert by["er", 0].replay_bytes == images * (3 * 32 * 32 * 4 + 8)
    assert by["derpp", 0].replay_bytes > by["er", 0].replay_bytes  # DER++ also keeps logits
    assert by["ewc", 0].extra_state_bytes == 2 * by["oewc", 0].extra_state_bytes  # a pair per past task vs one
    assert by["supsup", 0].per_task_stored_bytes * 8 >= by["supsup", 0].per_task_trained
    table = (tmp_path / "continual_baselines.md").read_text()
    assert all(cb.METHODS[k].label in table for k in keys) and "BWT" in table  # seeds merge: test_continual_baselines
    png = (tmp_path / "continual_baselines_task1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((tmp_path / "continual_baselines.json").read_text())
    assert len(saved["results"]) == n and saved["settings"]["seeds"] == [0]
