"""MAXL's pieces against independent computations: hierarchy, psi, masked softmax, losses, meta-gradient."""
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
from methods.losses import focal_loss, gradient_cosine, negative_batch_entropy
from models import create_model
from models.maxl_nets import block_mask, masked_softmax


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


def tiny_nets():
    torch.manual_seed(0)
    model = create_model("multitask", backbone="vgg16", classes=[2, 5], width_mult=1 / 32).double()
    generator = create_model("label_generator", backbone="vgg16", psi=PSI, width_mult=1 / 32).double()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    return model, generator, x, y


def meta_objective(model, generator, x, y):
    """Straightforward (first-order autograd only) evaluation of what the generator minimises:
    L_pri(theta1 - alpha * grad L(theta1, generated labels)) + w * sum(m log m), batch statistics throughout."""
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


def finite_difference_gradient(model, generator, x, y, coordinates, step=1e-5):
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
    params = list(generator.parameters())
    picks = [(0, (0, 0, 1, 1)), (4, (1, 0, 0, 2)), (len(params) - 4, (3, 2)), (len(params) - 2, (4, 1)),
             (len(params) - 1, (2,))]
    return [(params[i], idx) for i, idx in picks], picks


def analytic(model, generator, x, y, picks, **kwargs):
    grads, _ = maxl.meta_gradient(model, generator, x, y, ALPHA, ENTROPY_WEIGHT, GAMMA, **kwargs)
    return torch.stack([grads[i][idx] for i, idx in picks])


def test_meta_gradient_equals_finite_differences_of_the_post_step_loss():
    model, generator, x, y = tiny_nets()
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
    from engine import Session, compose

    settings = {"method": method, "model.width_mult": 1 / 16, "batch_size": 20, "device": "cpu",
                "num_workers": 0, "dataset": "cifar100", "channels_last": False, **overrides}
    cfg = compose("maxl_train", [f"{k}={v}" for k, v in settings.items()])
    data = cifar_like()
    data.train_images = np.random.default_rng(0).integers(0, 256, data.train_images.shape, dtype=np.uint8)
    return maxl.MaxlJob(cfg, data, Session(cfg, tmp_path, "maxl_train"))


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
