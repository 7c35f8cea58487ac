"""MAXL's pieces against independent computations: hierarchy, psi, masked softmax, losses, meta-gradient."""
import contextlib
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.func import functional_call

import methods.maxl as maxl
from dataset import cifar100
from dataset.hierarchical import HierarchicalData
from engine.errors import UserError
from methods.losses import focal_loss, gradient_cosine, negative_entropy
from models import create_model
from models.maxl_nets import block_mask, masked_softmax
from models.resnet import DropBlock, dropblock_schedules_paused


def negative_batch_entropy(soft_labels: torch.Tensor) -> torch.Tensor:
    """The reference's anti-collapse regulariser in one process: the negative entropy of the batch-mean label
    distribution (methods.maxl takes the mean over every rank's batch)."""
    return negative_entropy(soft_labels.mean(0))


def cifar_like(n_per_fine=1):
    """Labels with CIFAR-100's real structure: 5 fine classes under each coarse class (fine f -> coarse f // 5)."""
    fine = np.repeat(np.arange(100), n_per_fine)
    labels = cifar100.hierarchy_labels(fine // 5, fine)
    images = np.zeros((len(fine), 32, 32, 3), np.uint8)
    return HierarchicalData("cifar_like", images, labels, images[:100], labels[:100])


def aux_cfg(method="maxl", primary=20, auxiliary=100, psi=None):
    return OmegaConf.create({"method": method, "primary_level": primary, "auxiliary_level": auxiliary, "psi": psi})


def test_hierarchy_maps_give_the_reference_structure():
    data = cifar_like()
    assert data.level_sizes == [3, 10, 20, 100]
    fine_per_top = np.bincount(data.train_labels[:, 0])
    assert fine_per_top.tolist() == [50, 15, 35]
    assert maxl.auxiliary_task(data, aux_cfg()).psi == [5] * 20
    assert maxl.auxiliary_task(data, aux_cfg(primary=3, auxiliary=100)).psi == [50, 15, 35]
    assert maxl.auxiliary_task(data, aux_cfg(primary=10, auxiliary=20)).psi == [3, 2, 2, 2, 1, 3, 3, 1, 1, 2]
    assert maxl.auxiliary_task(data, aux_cfg(primary=3, auxiliary=10)).psi == [5, 1, 4]


def test_human_targets_sit_in_the_psi_blocks_and_random_targets_too():
    data = cifar_like(n_per_fine=3)
    task = maxl.auxiliary_task(data, aux_cfg(method="human", primary=3, auxiliary=20))
    targets = task.human_targets(data.train_labels)
    primary, coarse = data.train_labels[:, 0], data.train_labels[:, 2]
    lo, hi = task.offsets[primary], task.offsets[primary] + np.asarray(task.psi)[primary]
    assert ((targets >= lo) & (targets < hi)).all()
    # one-to-one with the true coarse labels
    assert len(np.unique(targets)) == 20 and len(np.unique(np.stack([targets, coarse], 1), axis=0)) == 20
    random_targets = task.random_targets(data.train_labels, seed=3)
    assert ((random_targets >= lo) & (random_targets < hi)).all()
    assert (random_targets == task.random_targets(data.train_labels, seed=3)).all()
    assert (random_targets != task.random_targets(data.train_labels, seed=4)).any()


def test_human_targets_of_a_split_missing_classes_are_those_of_the_whole_hierarchy():
    """Positions inside a block come from train and test together: a split lacking fine classes 2 and 51 gives
    every other image the target it has with all classes present (here the fine id itself: 5 per coarse)."""
    data = cifar_like(n_per_fine=2)
    test_fine = np.setdiff1d(np.arange(100), [2, 51])
    data.test_labels = cifar100.hierarchy_labels(test_fine // 5, test_fine)
    data.test_images = np.zeros((len(test_fine), 32, 32, 3), np.uint8)
    task = maxl.auxiliary_task(data, aux_cfg(method="human"))
    assert task.human_targets(data.test_labels).tolist() == test_fine.tolist()
    assert task.human_targets(data.train_labels).tolist() == data.train_labels[:, 3].tolist()
    # and for a coarser pair with blocks of several sizes: 3 -> 20 (psi [10, 3, 7])
    coarse = maxl.auxiliary_task(data, aux_cfg(method="human", primary=3, auxiliary=20))
    train_labels = data.train_labels
    without_some = train_labels[~np.isin(train_labels[:, 2], [0, 4, 6])]  # one coarse class under each top class
    expected = dict(zip(train_labels[:, 2], coarse.human_targets(train_labels)))
    assert coarse.human_targets(without_some).tolist() == [expected[c] for c in without_some[:, 2]]


@pytest.mark.parametrize("cfg, message", [
    (aux_cfg(psi=[5] * 19), "psi has 19 entries but the primary level has 20 classes"),
    (aux_cfg(psi=[0] + [5] * 19), "psi[0]=0"),
    (aux_cfg(primary=7), "primary_level=7 is not a level of dataset cifar_like"),
    (aux_cfg(method="human", psi=4), "method=human takes psi from the hierarchy"),
    (aux_cfg(method="human", primary=100, auxiliary=20), "method=human needs an auxiliary level finer"),
])
def test_bad_psi_and_levels_are_clear_errors(cfg, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        maxl.auxiliary_task(cifar_like(), cfg)


def test_flat_dataset_needs_an_explicit_psi():
    labels = np.arange(10).reshape(-1, 1)
    data = HierarchicalData("flat", np.zeros((10, 32, 32, 3), np.uint8), labels, np.zeros((10, 32, 32, 3), np.uint8), labels)
    with pytest.raises(UserError, match="psi cannot be derived"):
        maxl.auxiliary_task(data, aux_cfg(primary=10, auxiliary=None))
    assert maxl.auxiliary_task(data, aux_cfg(primary=10, auxiliary=None, psi=3)).psi == [3] * 10


def test_masked_softmax_is_the_softmax_of_the_block():
    psi = [2, 3, 4]
    logits = torch.randn(6, 9) * 30  # large logits: no overflow
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    mask = block_mask(psi)[y]
    probs = masked_softmax(logits, mask)
    assert torch.allclose(probs.sum(1), torch.ones(6))
    assert (probs[~mask] == 0).all()
    starts = [0, 2, 5]
    for i, c in enumerate(y.tolist()):
        block = slice(starts[c], starts[c] + psi[c])
        assert torch.allclose(probs[i, block], logits[i, block].softmax(0))


def test_focal_loss_matches_hand_computed_values():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    log_probs = probs.log()
    expected_hard = -((0.3 ** 2) * math.log(0.7) + (0.5 ** 2) * math.log(0.5)) / 2
    assert focal_loss(log_probs, torch.tensor([0, 2]), 2.0).item() == pytest.approx(expected_hard, rel=1e-6)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    expected_soft = -(0.5 * 0.09 * math.log(0.7) + 0.5 * 0.64 * math.log(0.2) + 0.5625 * math.log(0.25)) / 2
    assert focal_loss(log_probs, soft, 2.0).item() == pytest.approx(expected_soft, rel=1e-6)


def test_negative_batch_entropy_and_cossim():
    soft = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    mean = [0.5, 0.25, 0.25]
    assert negative_batch_entropy(soft).item() == pytest.approx(sum(m * math.log(m) for m in mean))
    logits = torch.randn(2, 4, requires_grad=True)  # the last class is absent from the batch
    blocked = masked_softmax(logits, torch.tensor([[True, True, True, False]] * 2))
    grad, = torch.autograd.grad(negative_batch_entropy(blocked), logits)
    assert torch.isfinite(grad).all() and (grad[:, 3] == 0).all()
    a = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1.0, -1.0])]
    b = [torch.tensor([[1.0, 1.0], [0.0, 3.0]]), torch.tensor([2.0, 5.0])]
    # tensor 1: rows cos 1/sqrt2 and 1; tensor 2 (1-d): signs agree, disagree
    expected = ((1 / math.sqrt(2) + 1) / 2 + (1 - 1) / 2) / 2
    assert gradient_cosine(a, b).item() == pytest.approx(expected)


# ---- the meta-gradient ---------------------------------------------------------------------------------

PSI = [2, 3]
ALPHA, ENTROPY_WEIGHT, GAMMA = 0.5, 0.2, 2.0
BACKBONES = {"vgg16": (1 / 32, 32), "resnet12": (1 / 16, 16), "resnet18": (1 / 16, 16), "conv4": (1 / 16, 8)}
SEED = 5  # seeds the dropout and DropBlock masks of each evaluation of the meta-objective


def tiny_nets(backbone="vgg16"):
    """Float64 nets at tiny width and input size. DropBlock's schedule is put past its end, so that its rate stays
    0.1 while the finite differences run further forwards (the masks then depend on the random state only)."""
    width, size = BACKBONES[backbone]
    torch.manual_seed(0)
    model = create_model("multitask", backbone=backbone, classes=[2, 5], width_mult=width).double()
    generator = create_model("label_generator", backbone=backbone, psi=PSI, width_mult=width).double()
    for block in [m for net in (model, generator) for m in net.modules() if isinstance(m, DropBlock)]:
        block.steps.fill_(10**6)
    x = torch.randn(8, 3, size, size, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    return model, generator, x, y


def meta_objective(model, generator, x, y):
    """Straightforward (first-order autograd only) evaluation of what the generator minimises:
    L_pri(theta1 - alpha * grad L(theta1, generated labels)) + w * sum(m log m), batch statistics throughout;
    random masks drawn in the order meta_gradient draws them (generator, net at theta1, net at theta1+)."""
    torch.manual_seed(SEED)
    params = dict(model.named_parameters())
    with torch.no_grad():
        soft = generator(x, y)
    pri, aux = functional_call(model, params, (x,))
    inner = focal_loss(pri.log_softmax(1), y, GAMMA) + focal_loss(aux.log_softmax(1), soft, GAMMA)
    grads = torch.autograd.grad(inner, list(params.values()))
    fast = {n: p - ALPHA * g for (n, p), g in zip(params.items(), grads)}
    with torch.no_grad(), maxl.batch_statistics(model):
        after = functional_call(model, fast, (x,))[0]
        return (focal_loss(after.log_softmax(1), y, GAMMA) + ENTROPY_WEIGHT * negative_batch_entropy(soft)).item()


def finite_difference_gradient(model, generator, x, y, coordinates, step=1e-6):
    result = []
    for param, index in coordinates:
        original = param.data[index].item()
        values = []
        for sign in (1, -1):
            param.data[index] = original + sign * step
            values.append(meta_objective(model, generator, x, y))
        param.data[index] = original
        result.append((values[0] - values[1]) / (2 * step))
    return torch.tensor(result, dtype=torch.float64)


def probe_coordinates(generator):
    """A few generator weights: the first and a middle convolution, a batch norm scale and the head."""
    params = list(generator.parameters())
    convs = [i for i, p in enumerate(generator.backbone.parameters()) if p.dim() == 4]
    norm = next(m for m in generator.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    vector = next(i for i, p in enumerate(params) if p is norm.weight)
    picks = [(convs[0], (0, 0, 1, 1)), (convs[len(convs) // 2], (1, 0, 0, 0)), (vector, (1,)),
             (len(params) - 4, (3, 2)), (len(params) - 2, (4, 1)), (len(params) - 1, (2,))]
    return [(params[i], idx) for i, idx in picks], picks


def analytic(model, generator, x, y, picks, **kwargs):
    torch.manual_seed(SEED)
    grads, _ = maxl.meta_gradient(model, generator, x, y, ALPHA, ENTROPY_WEIGHT, GAMMA, **kwargs)
    return torch.stack([grads[i][idx] for i, idx in picks])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_meta_gradient_equals_finite_differences_of_the_post_step_loss(backbone):
    """With every backbone, also with dropout and DropBlock switched on (ResNets)."""
    model, generator, x, y = tiny_nets(backbone)
    coordinates, picks = probe_coordinates(generator)
    expected = finite_difference_gradient(model, generator, x, y, coordinates)
    got = analytic(model, generator, x, y, picks)
    assert expected.abs().max() > 1e-4  # a meaningful gradient
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-9), (got, expected)


def test_cutting_the_second_order_path_breaks_the_equality(monkeypatch):
    """The comparison above detects a meta-gradient without its second-order term."""
    model, generator, x, y = tiny_nets()
    coordinates, picks = probe_coordinates(generator)
    expected = finite_difference_gradient(model, generator, x, y, coordinates)
    monkeypatch.setattr(maxl, "jvp", lambda f, primals, tangents: (None, torch.zeros_like(f(*primals))))
    cut = analytic(model, generator, x, y, picks)
    assert not torch.allclose(cut, expected, rtol=1e-2, atol=1e-6)


def test_forward_mode_pass_without_the_forward_masks_is_not_exact(monkeypatch):
    """With dropout and DropBlock the jvp must see the masks of the forward whose gradient made theta1+: with
    fresh masks there the comparison above fails."""
    model, generator, x, y = tiny_nets("resnet12")
    coordinates, picks = probe_coordinates(generator)
    expected = finite_difference_gradient(model, generator, x, y, coordinates)
    monkeypatch.setattr(maxl, "replayed_randomness", lambda state, device: contextlib.nullcontext())
    fresh_masks = analytic(model, generator, x, y, picks)
    assert not torch.allclose(fresh_masks, expected, rtol=1e-3, atol=1e-7)


def test_only_a_backbone_that_draws_masks_pays_for_their_replay(monkeypatch):
    """VGG-16 (no dropout, no DropBlock) or a ResNet at drop rate 0: the meta step copies no random state."""
    assert maxl.draws_masks(tiny_nets("resnet12")[0])
    no_masks = create_model("multitask", backbone="resnet12", classes=[2, 5], width_mult=1 / 16, drop_rate=0.0)
    assert not maxl.draws_masks(no_masks) and not maxl.draws_masks(tiny_nets("resnet12")[0].eval())
    model, generator, x, y = tiny_nets("vgg16")
    assert not maxl.draws_masks(model)

    def no_copy(device):
        raise AssertionError("the random state was copied")

    monkeypatch.setattr(maxl, "_random_state", no_copy)
    for first_order in (False, True):
        maxl.meta_gradient(model, generator, x, y, ALPHA, ENTROPY_WEIGHT, GAMMA, first_order=first_order)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_step_advances_each_dropblock_schedule_once_and_keeps_the_random_stream(first_order):
    model, generator, x, y = tiny_nets("resnet18")
    blocks = [m for net in (model, generator) for m in net.modules() if isinstance(m, DropBlock)]
    for block in blocks:
        block.steps.fill_(7)
    torch.manual_seed(1)
    maxl.meta_gradient(model, generator, x, y, ALPHA, ENTROPY_WEIGHT, GAMMA, first_order=first_order)
    after_step = torch.rand(3)
    assert len(blocks) == 4 and all(int(block.steps) == 8 for block in blocks)
    # The replays restore the random state: what follows is what three plain forwards would leave.
    torch.manual_seed(1)
    for block in blocks:
        block.steps.fill_(7)
    generator(x, y)
    model(x)
    with maxl.batch_statistics(model), dropblock_schedules_paused(model):
        model(x)
    assert torch.equal(torch.rand(3), after_step)


def test_first_order_variant_gives_a_zero_curvature_for_a_zero_direction():
    """One primary class: the primary loss is 0 for any weights, so v = 0; the finite difference must then
    give no curvature (not 0 / 0) and the generator gradient is the entropy term's alone."""
    torch.manual_seed(0)
    model = create_model("multitask", backbone="conv4", classes=[1, 5], width_mult=1 / 16).double()
    generator = create_model("label_generator", backbone="conv4", psi=[5], width_mult=1 / 16).double()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    first_order, _ = maxl.meta_gradient(model, generator, x, y, ALPHA, ENTROPY_WEIGHT, GAMMA, first_order=True)
    entropy_grad = torch.autograd.grad(negative_batch_entropy(generator(x, y)), list(generator.parameters()))
    assert entropy_grad[-1].abs().max() > 1e-3
    for got, expected in zip(first_order, entropy_grad):
        assert torch.allclose(got, ENTROPY_WEIGHT * expected, atol=1e-15)


def test_first_order_approximates_second_order_and_applies_the_entropy_term():
    """The finite difference converges to the exact mixed derivative as its step shrinks; at the reference's
    step (0.01 / ||v||) it is already close on this tiny, very nonlinear net."""
    model, generator, x, y = tiny_nets()
    gen_params = list(generator.parameters())

    def flat(grads):
        return torch.cat([g.flatten() for g in grads])

    exact = flat(maxl.meta_gradient(model, generator, x, y, ALPHA, ENTROPY_WEIGHT, GAMMA)[0])
    for fd_epsilon, tolerance in ((0.01, 0.3), (1e-4, 1e-6)):
        approx = flat(maxl.meta_gradient(model, generator, x, y, ALPHA, ENTROPY_WEIGHT, GAMMA, first_order=True,
                                         fd_epsilon=fd_epsilon)[0])
        assert ((exact - approx).norm() / exact.norm()) < tolerance
    assert torch.nn.functional.cosine_similarity(exact, approx, dim=0) > 0.97
    with_term, _ = maxl.meta_gradient(model, generator, x, y, ALPHA, ENTROPY_WEIGHT, GAMMA, first_order=True)
    without, _ = maxl.meta_gradient(model, generator, x, y, ALPHA, 0.0, GAMMA, first_order=True)
    entropy_grad = torch.autograd.grad(negative_batch_entropy(generator(x, y)), gen_params)
    assert entropy_grad[-1].abs().max() > 1e-3
    for a, b, e in zip(with_term, without, entropy_grad):
        assert torch.allclose(a - b, ENTROPY_WEIGHT * e, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_virtual_steps_leave_batch_norm_running_statistics_untouched(first_order):
    model, generator, x, y = tiny_nets()
    reference = create_model("multitask", backbone="vgg16", classes=[2, 5], width_mult=1 / 32).double()
    reference.load_state_dict(model.state_dict())
    reference(x)  # one plain training forward: what the meta step's forward at theta1 does to the statistics
    maxl.meta_gradient(model, generator, x, y, ALPHA, ENTROPY_WEIGHT, GAMMA, first_order=first_order)
    for (name, got), expected in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(got, expected), name
    assert not any(True for _ in generator.buffers() if _.dtype.is_floating_point and _.dim())  # no running stats


# ---- the multi-task step -------------------------------------------------------------------------------

def make_job(method, tmp_path, **overrides):
    from dataclasses import replace

    from engine import Session, compose
    from methods.scripts import SCRIPTS

    settings = {"method": method, "model.width_mult": 1 / 16, "batch_size": 20, "device": "cpu",
                "num_workers": 0, "dataset": "cifar100", "channels_last": False, **overrides}
    cfg = compose(SCRIPTS["maxl_train"], [f"{k}={v}" for k, v in settings.items()])
    data = cifar_like()
    data.train_images = np.random.default_rng(0).integers(0, 256, data.train_images.shape, dtype=np.uint8)
    return maxl.MaxlJob(cfg, data, Session(cfg, tmp_path, replace(SCRIPTS["maxl_train"], writes_checkpoints=False)))


@pytest.mark.parametrize("method, with_cossim", [("maxl", False), ("maxl", True), ("human", True),
                                                 ("single", False)])
def test_multitask_step_is_sgd_on_the_summed_focal_losses(method, with_cossim, tmp_path):
    job = make_job(method, tmp_path)
    x, targets, _ = next(iter(job.train_loader))
    before = {n: p.detach().clone() for n, p in job.model.named_parameters()}
    # independent computation on a copy: same weights, same batch
    copy = create_model("multitask", backbone="vgg16", classes=[o.out_features for o in
                                                                [h[-1] for h in job.model.heads]],
                        width_mult=1 / 16)
    copy.load_state_dict(job.model.state_dict())
    outputs = copy(x)
    loss = -(torch.nn.functional.one_hot(targets[:, 0], 20) * (1 - outputs[0].softmax(1)) ** 2
             * outputs[0].log_softmax(1)).sum(1).mean()
    if method != "single":
        with torch.no_grad():
            aux = job.generator(x, targets[:, 0]) if method == "maxl" else \
                torch.nn.functional.one_hot(targets[:, 1], 100).float()
        loss = loss - (aux * (1 - outputs[1].softmax(1)) ** 2 * outputs[1].log_softmax(1)).sum(1).mean()
    grads = dict(zip(before, torch.autograd.grad(loss, list(copy.parameters()))))
    metrics = job.multitask_step(x, targets, with_cossim=with_cossim)
    for name, p in job.model.named_parameters():
        assert torch.allclose(p, before[name] - job.cfg.lr * grads[name], atol=1e-6), name
    assert ("train/cossim" in metrics) == (with_cossim and method != "single")


def test_multitask_step_keeps_a_float64_model_in_float64(tmp_path):
    """The losses run in the model's precision when it is wider than float32: the step equals a float64
    computation to 1e-12 (a float32 loss would be off by about 1e-8)."""
    job = make_job("maxl", tmp_path, model="conv4")
    job.model.double()
    job.generator.double()
    x, targets, _ = next(iter(job.train_loader))
    x = x.double()
    before = {n: p.detach().clone().requires_grad_() for n, p in job.model.named_parameters()}
    with torch.no_grad():
        soft = job.generator(x, targets[:, 0])
    pri, aux = functional_call(job.model, before, (x,))  # the same forward: batch statistics, float64
    loss = focal_loss(pri.log_softmax(1), targets[:, 0], GAMMA) + focal_loss(aux.log_softmax(1), soft, GAMMA)
    grads = dict(zip(before, torch.autograd.grad(loss, list(before.values()))))
    metrics = job.multitask_step(x, targets, with_cossim=False)
    assert metrics["train/loss"].dtype == torch.float64
    for name, p in job.model.named_parameters():
        torch.testing.assert_close(p, before[name] - job.cfg.lr * grads[name], rtol=0, atol=1e-12)


def independent_nmi(a, b):
    """NMI with the arithmetic-mean normalisation, from the joint distribution (scikit-learn's default)."""
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum()
    ha, hb = -(pa[pa > 0] * np.log(pa[pa > 0])).sum(), -(pb[pb > 0] * np.log(pb[pb > 0])).sum()
    return 0.0 if mi == 0 else mi / ((ha + hb) / 2)


def independent_purity(true, predicted):
    return sum(np.bincount(true[predicted == c]).max() for c in np.unique(predicted)) / len(true)


def test_generator_agreement_against_an_independent_computation():
    rng = np.random.default_rng(0)
    # 3 primary classes with finer classes {0, 1, 2}, {3, 4}, {5} (the last has nothing to find)
    parent = np.array([0, 0, 0, 1, 1, 2])
    true = rng.integers(0, 6, 400)
    primary = parent[true]
    psi, offsets = np.array([3, 2, 1]), np.array([0, 3, 5])  # generated labels lie in the primary class's block
    in_block = offsets[primary] + (rng.random(400) * psi[primary]).astype(int)
    generated = np.where(rng.random(400) < 0.7, true, in_block)
    got = maxl.generator_agreement(true, generated, primary)
    inside = [primary == 0, primary == 1]
    shuffle = np.random.default_rng(0)  # chance: the labels permuted inside each class, classes in order
    shuffled = [shuffle.permutation(generated[m]) for m in inside]
    expected = {
        "gen/nmi": independent_nmi(true, generated), "gen/nmi_trivial": independent_nmi(true, primary),
        "gen/purity": independent_purity(true, generated), "gen/purity_trivial": independent_purity(true, primary),
        "gen/nmi_within": np.mean([independent_nmi(true[m], generated[m]) for m in inside]),
        "gen/nmi_within_chance": np.mean([independent_nmi(true[m], s) for m, s in zip(inside, shuffled)]),
        "gen/purity_within": np.mean([independent_purity(true[m], generated[m]) for m in inside]),
        "gen/purity_within_trivial": np.mean([np.bincount(true[m]).max() / m.sum() for m in inside]),
        "gen/purity_within_chance": np.mean([independent_purity(true[m], s) for m, s in zip(inside, shuffled)]),
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # the block structure alone: one label per block scores the trivial values, and nothing within classes
    trivial = maxl.generator_agreement(true, offsets[primary], primary)
    assert trivial["gen/nmi"] == pytest.approx(got["gen/nmi_trivial"]) and trivial["gen/nmi_within"] == 0
    assert trivial["gen/purity_within"] == pytest.approx(got["gen/purity_within_trivial"])
    assert got["gen/nmi_trivial"] > 0.5 and got["gen/nmi"] > got["gen/nmi_trivial"]
    assert got["gen/nmi_within_chance"] < 0.05 < 0.3 < got["gen/nmi_within"]
    # random labels inside the block score about chance, which is above 0 on a finite test set
    unrelated = maxl.generator_agreement(true, in_block, primary)
    assert 0 < unrelated["gen/nmi_within"] < 0.05 and unrelated["gen/nmi_within_chance"] < 0.05
    # size-weighted, the within-class purity is the overall purity (clusters never cross primary classes)
    sizes = [m.sum() for m in inside + [primary == 2]]
    weighted = np.average([independent_purity(true[m], generated[m]) for m in inside + [primary == 2]],
                          weights=sizes)
    assert weighted == pytest.approx(got["gen/purity"])


@pytest.mark.parametrize("backbone", ["resnet12", "conv4"])
def test_maxl_job_trains_and_evaluates_with_other_backbones(backbone, tmp_path):
    """Both steps and the evaluation run with any backbone; DropBlock's schedule advances once per real forward
    of each network (multi-task step: net and generator; meta step: net at theta1 and generator)."""
    job = make_job("maxl", tmp_path, model=backbone)
    x, targets, _ = next(iter(job.train_loader))
    assert isinstance(job.model.backbone, type(create_model(backbone, width_mult=1 / 16)))
    before = [p.detach().clone() for p in job.generator.parameters()]
    metrics = job.multitask_step(x, targets, with_cossim=True) | job.generator_step(x, targets)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, job.generator.parameters()))
    for net in (job.model, job.generator):
        assert all(int(m.steps) == 2 for m in net.modules() if isinstance(m, DropBlock))
    evaluation = job.evaluate(0)
    assert job.generator.training
    assert {"gen/nmi", "gen/nmi_trivial", "gen/nmi_within", "gen/purity_within_trivial"} <= evaluation.keys()
    assert evaluation["gen/purity_within_trivial"] == pytest.approx(0.2)  # 5 equal fine classes per coarse class
