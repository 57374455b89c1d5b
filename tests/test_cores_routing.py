"""Each method's defining computation recomputed by hand, on crafted small tensors, and compared with the library.

Issue "Tests that would catch a wrong method": every expected value below is written in this file in plain torch
from the official code's formula (cited), never produced by a library helper. Covered:

* HiDe-LoRA (thu-ml/HiDe-PET @ 5811702): the contrastive regulariser ``orth_loss``, the momentum blend of the
  task-specific pool over three tasks, task-identity inference and its accuracy metric over several tasks;
* SD-LoRA (WuYichen-97/SD-Lora-CL @ 8bacded): the layer output with learnt magnitudes, unit-norm stored directions
  and a LoRA scale != 1 on the current branch only, and where the gradients go;
* class masking: ``mask_logits``, ``mask_logits_per_sample``, ``MaskedCriterion``, ``ClassMaskMixin`` and the CLI's
  ``--masked-loss`` / ``--no-masked-loss`` per method.

Small objects only (no data set, no pretrained weight); the strategies' plugins are driven through their hooks with
a stand-in strategy where the hook reads only a few attributes.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from models import LoRAMagnitudes, SDLoRALinear, TaskLoRAMixin
from strategies import (HiDeLoRAPlugin, MaskedCriterion, SDLoRAPlugin, TaskInferenceAccuracyPluginMetric,
                        mask_logits, mask_logits_per_sample)


# -- hand references -----------------------------------------------------------------------------------------------

def _hand_ce(logits: torch.Tensor, targets, kept_per_row) -> torch.Tensor:
    """Mean over rows of ``-z[i, y_i] + log Σ_{j ∈ kept_i} exp z[i, j]``: cross-entropy over each row's kept classes
    only, i.e. the official ``logits.index_fill(not_mask, -inf)`` followed by ``CrossEntropyLoss`` (HiDe-PET
    ``engines/hide_lora_wtp_and_tap_engine.py`` L44-52), written out with explicit sums."""
    rows = []
    for i, kept in enumerate(kept_per_row):
        z = logits[i]
        m = max(float(z[j].detach()) for j in kept)
        lse = m + torch.log(sum(torch.exp(z[j] - m) for j in kept))
        rows.append(lse - z[int(targets[i])])
    return sum(rows) / len(rows)


def _hand_orth_loss(features: torch.Tensor, centroids: list[torch.Tensor]) -> torch.Tensor:
    """HiDe-PET ``engines/hide_lora_wtp_and_tap_engine.py`` ``orth_loss`` (L488-506): ``M = [stored class means
    (every centroid of every class); batch pre-logit features]``, ``sim = M Mᵀ / 0.8``, and
    ``cross_entropy(sim, arange(|M|))`` (mean over the rows): each row of M must be most similar to itself. Written
    with explicit dot products and a max-shifted log-sum-exp; the weight ``reg`` is applied by the caller."""
    M = list(centroids) + [f for f in features]
    n = len(M)
    total = 0.0
    for i in range(n):
        sims = [torch.dot(M[i], M[j]) / 0.8 for j in range(n)]
        m = max(float(s.detach()) for s in sims)
        lse = m + torch.log(sum(torch.exp(s - m) for s in sims))
        total = total + (lse - sims[i])
    return total / n


# -- HiDe-LoRA ----------------------------------------------------------------------------------------------------

def test_hide_contrastive_loss_is_the_official_orth_loss():
    """Exact value of ``HiDeLoRAPlugin.contrastive_loss`` against ``_hand_orth_loss`` (temperature 0.8, positives on
    the diagonal, every stored centroid and every batch feature as negatives, mean reduction), without stored
    classes (the official ``else`` branch, L503-506) and with multi-centroid statistics of two classes; the
    centroids are constants (only the features get a gradient) and ``before_backward`` adds ``reg`` times it."""
    plugin = HiDeLoRAPlugin(target_modules="x", reg=0.01)
    feats = torch.tensor([[0.9, -0.2, 0.4, 0.1], [0.3, 0.8, -0.5, 0.2], [-0.6, 0.1, 0.7, -0.3]],
                         dtype=torch.float64, requires_grad=True)
    # no statistics yet: the batch against itself
    got = plugin.contrastive_loss(feats)
    want = _hand_orth_loss(feats, [])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # hand-checked number for this batch, so a wrong formula in both places cannot agree by accident
    sim = [[sum(a * b for a, b in zip(r, s)) / 0.8 for s in feats.tolist()] for r in feats.tolist()]
    row0 = -sim[0][0] + math.log(sum(math.exp(v) for v in sim[0]))
    row1 = -sim[1][1] + math.log(sum(math.exp(v) for v in sim[1]))
    row2 = -sim[2][2] + math.log(sum(math.exp(v) for v in sim[2]))
    assert got.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-12)

    # class 4 stored with two k-means centroids, class 1 with one (stored out of class order on purpose)
    c4 = torch.tensor([[0.5, 0.5, 0.0, -0.1], [0.2, -0.7, 0.3, 0.4]], dtype=torch.float64)
    c1 = torch.tensor([[-0.4, 0.3, 0.6, 0.2]], dtype=torch.float64)
    plugin.stats = {4: dict(means=c4, vars=torch.ones_like(c4)), 1: dict(means=c1, vars=torch.ones_like(c1))}
    got = plugin.contrastive_loss(feats)
    cents = [c4[0], c4[1], c1[0]]
    want = _hand_orth_loss(feats, cents)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # gradient: that of the hand formula, w.r.t. the features only
    (g_lib,) = torch.autograd.grad(got, feats)
    (g_ref,) = torch.autograd.grad(want, feats)
    torch.testing.assert_close(g_lib, g_ref, rtol=1e-10, atol=1e-12)
    assert not c4.requires_grad and c4.grad is None

    # the training loss gets reg · orth_loss of the head's input (official: loss += orth_loss(pre_logits), L52,
    # which returns args.reg * loss, L502)
    plugin._features = feats.detach()
    strategy = SimpleNamespace(loss=torch.tensor(1.5, dtype=torch.float64))
    plugin.before_backward(strategy)
    assert strategy.loss.item() == pytest.approx(1.5 + 0.01 * want.item(), rel=1e-12)


def _tiny_net():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 5))


def _fake_hide_strategy(model, opt, task, classes):
    return SimpleNamespace(model=model, optimizer=opt, device="cpu", train_mb_size=4,
                           experience=SimpleNamespace(current_experience=task, classes_in_this_experience=classes))


def test_hide_three_task_momentum_blend_and_warm_start():
    """The task-specific pool over three tasks, driven through the plugin's hooks with crafted "trained" factors
    X_t per task, against the official code by hand:

    * warm start: slot t (t > 0) starts as slot t-1 (``hide_lora_wtp_and_tap_engine.py`` L238-257);
    * after task t > 0: ``slot_t ← (1 - m) · slot_t + m · mean(slot_0 … slot_{t-1})`` on A and B separately
      (L270-283, ``k_lora_A[0:task_id].mean(dim=0)`` of the already blended earlier slots), so with m = 1/4
      slot_1 = 3/4 X_1 + 1/4 X_0 and slot_2 = 3/4 X_2 + 1/4 · (slot_0 + slot_1) / 2; three tasks tell "mean of
      every earlier slot" from "the previous slot" (identical with two tasks);
    * earlier slots never change; the regulariser's features are the head's input (the code's ``pre_logits``).
    The values are small integers and quarters, so every expected value is exact in float32."""
    torch.manual_seed(0)
    model = _tiny_net()
    plugin = HiDeLoRAPlugin(target_modules=r"0|2", r=2, lora_momentum=0.25, ca_method="variance", ca_epochs=0)
    plugin.prepare(model)
    layers = [m for m in model.modules() if isinstance(m, TaskLoRAMixin)]
    assert len(layers) == 2
    # skip the data pass for the class statistics (not under test): a few fixed features per class
    plugin.extract_features = lambda strategy, m, route=None: (
        torch.arange(24.0).reshape(4, 6), torch.tensor((strategy.experience.classes_in_this_experience * 4)[:4]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def crafted(t, k):  # layer k's "trained" factors at the end of task t: distinct small integers
        a_shape, b_shape = layers[k].lora_A.shape, layers[k].lora_B.shape
        A = (torch.arange(float(a_shape.numel())).reshape(a_shape) - 3 + 5 * t + 2 * k) * (1 + t)
        B = torch.arange(float(b_shape.numel())).reshape(b_shape) * (-1) ** t + 7 * t - k
        return A, B

    X = {}
    classes = {0: [0, 1], 1: [2, 3], 2: [4]}
    for t in range(3):
        strategy = _fake_hide_strategy(model, opt, t, classes[t])
        plugin.before_training_exp(strategy)
        for layer in layers if t else []:
            assert torch.equal(layer.lora_A, layer.bank_A[str(t - 1)]), f"slot {t} must start as slot {t - 1}"
            assert torch.equal(layer.lora_B, layer.bank_B[str(t - 1)]), f"slot {t} must start as slot {t - 1}"
        # the regulariser's features are the input of the head (pre-logits), captured on the forward pass
        x = torch.randn(3, 4)
        plugin.before_forward(strategy)
        model(x)
        with torch.no_grad():
            h = torch.relu(model[2](torch.relu(model[0](x))))
        torch.testing.assert_close(plugin._features, h)
        # "training": set the current factors to the crafted values
        with torch.no_grad():
            for k, layer in enumerate(layers):
                X[t, k] = crafted(t, k)
                layer.lora_A.copy_(X[t, k][0])
                layer.lora_B.copy_(X[t, k][1])
        plugin.after_training_exp(strategy)

    m = 0.25
    for k, layer in enumerate(layers):
        for i in (0, 1):  # A, then B: blended factor by factor
            bank = layer.bank_A if i == 0 else layer.bank_B
            x0, x1, x2 = X[0, k][i], X[1, k][i], X[2, k][i]
            slot0 = x0
            slot1 = (1 - m) * x1 + m * x0
            slot2 = (1 - m) * x2 + m * (slot0 + slot1) / 2
            assert torch.equal(bank["0"], slot0)
            assert torch.equal(bank["1"], slot1)
            assert torch.equal(bank["2"], slot2), (bank["2"] - slot2).abs().max()
    assert plugin.trained_tasks == [0, 1, 2]


def _tii_logits(winners, n_classes=10, unseen_bait=(1, 4, 6, 8)):
    """One row per sample whose largest logit among the seen classes is ``winners[i]``; every other row also puts
    an even larger logit on an unseen class (never trained, so never a prediction)."""
    rows = []
    for i, w in enumerate(winners):
        r = torch.linspace(0.0, 0.9, n_classes).roll(i)
        r[w] = 5.0
        if i % 2:
            r[unseen_bait[i % len(unseen_bait)]] = 9.0
        rows.append(r)
    return torch.stack(rows)


def test_hide_task_identity_inference_and_its_accuracy_over_three_tasks():
    """Task-identity inference (HiDe-PET ``hide_lora_wtp_and_tap_engine.py`` ``evaluate``: the shared model's
    logits with the unseen classes at -inf (L99-105), argmax, mapped to the class's task (L110-111)) and
    ``TaskInferenceAccuracyPluginMetric`` (``utils.task_inference_accuracy`` L239-244 averaged with weight =
    batch size, L136: the share of an experience's samples whose inferred task is right), per experience and over
    the stream, on crafted shared-model logits over three tasks with a non-contiguous class order and two
    mini-batches of different sizes in one experience (a mean of batch means would give 7/12, not 3/5). Expected
    numbers written by hand: Exp0 2/4, Exp1 3/5, Exp2 4/6, stream 9/15."""
    plugin = HiDeLoRAPlugin(target_modules="x")
    plugin.shared_model = nn.Identity()  # its "logits" are the crafted inputs
    plugin.task_classes = {0: [7, 2], 1: [0, 5], 2: [3, 9]}
    plugin.seen_classes = [0, 2, 3, 5, 7, 9]
    metric = TaskInferenceAccuracyPluginMetric()
    strategy = SimpleNamespace(method_plugin=plugin, plugins=[], model=nn.Linear(2, 2),
                               clock=SimpleNamespace(train_iterations=11), experience=None, mb_x=None)
    batches = {0: [[7, 2, 0, 9]],  # tasks 0 0 1 2 -> 2 of 4
               1: [[5, 5, 3], [0, 7]],  # tasks 1 1 2 | 1 0 -> 3 of 5
               2: [[9, 3, 3, 2, 5, 9]]}  # tasks 2 2 2 0 1 2 -> 4 of 6
    owner = {7: 0, 2: 0, 0: 1, 5: 1, 3: 2, 9: 2}
    metric.before_eval(strategy)
    per_exp = {}
    for e, mbs in batches.items():
        strategy.experience = SimpleNamespace(current_experience=e)
        metric.before_eval_exp(strategy)
        for winners in mbs:
            strategy.mb_x = _tii_logits(winners)
            plugin.before_eval_forward(strategy)
            pred, true = plugin.last_tii
            assert pred.tolist() == [owner[w] for w in winners]
            assert true.tolist() == [e] * len(winners)
            metric.after_eval_iteration(strategy)
        (mv,) = metric.after_eval_exp(strategy)
        assert mv.name == f"TII_Acc_Exp/eval_phase/test_stream/Exp{e:03d}"
        per_exp[e] = mv.value
    (stream,) = metric.after_eval(strategy)
    assert per_exp == {0: pytest.approx(2 / 4), 1: pytest.approx(3 / 5), 2: pytest.approx(4 / 6)}
    assert stream.name == "TII_Acc_Stream/eval_phase/test_stream" and stream.value == pytest.approx(9 / 15)
    # a method without task inference reports nothing
    other = TaskInferenceAccuracyPluginMetric()
    s2 = SimpleNamespace(method_plugin=SDLoRAPlugin(target_modules="x"), plugins=[],
                         experience=SimpleNamespace(current_experience=0), clock=strategy.clock)
    other.before_eval(s2)
    other.before_eval_exp(s2)
    other.after_eval_iteration(s2)
    assert other.after_eval_exp(s2) is None and other.after_eval(s2) is None


# -- SD-LoRA ------------------------------------------------------------------------------------------------------

def test_sd_lora_layer_output_scale_and_gradients_by_hand():
    """SD-LoRA layer with LoRA scale s = alpha / r = 3 and magnitudes != 1, two stored tasks and a current one,
    against ``y = W x + b + Σ_i α_i · B_i A_i x / (‖B_i‖_F ‖A_i‖_F) + α · s · B A x`` written by hand from the raw
    (non-unit) factors each task ended with. Official ``backbone/lora.py`` L183-191: the saved directions divided by
    ``‖B_i‖ ‖A_i‖`` times ``scaling_factor_prev[i]``, the current ``scaling_factor[0] · B A x`` (the code has no
    alpha/r; the library's docstring puts its s on the current branch only, where it is not normalised away).
    Checked with gradients on (stacked low-rank pass) and off (one pass with W + ΔW); the gradients of a weighted
    sum of the output equal those of the hand formula for the past magnitudes, the current magnitude and the
    current factors, and nothing reaches the stored directions or the base weight."""
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    layer = SDLoRALinear(base, r=2, alpha=6.0)
    assert layer.scaling == 3.0
    mags = LoRAMagnitudes(0.8)
    object.__setattr__(layer, "magnitudes", mags)
    raw = {0: (torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0], [0.0, 1.0, 2.0, -1.0, 1.5]]),
               torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.0, 3.0], [-2.0, 1.0]])),
           1: (torch.tensor([[0.3, 0.1, -0.2, 0.0, 0.9], [1.2, -0.4, 0.0, 0.7, 0.2]]),
               torch.tensor([[0.5, 0.5], [-0.1, 0.8], [0.6, 0.0], [0.2, -0.3]]))}
    for t in (0, 1):  # task t trains, then its direction is stored and a magnitude is created for it
        layer.current_task = t
        with torch.no_grad():
            layer.lora_A.copy_(raw[t][0])
            layer.lora_B.copy_(raw[t][1])
        layer.store_adapter(t)
        mags.freeze_current(t)
    A2 = torch.tensor([[0.4, -0.3, 0.2, 0.1, -0.5], [0.0, 0.6, -0.2, 0.3, 0.1]])
    B2 = torch.tensor([[0.7, -0.1], [0.2, 0.4], [-0.3, 0.5], [0.1, 0.1]])
    layer.current_task = 2
    with torch.no_grad():
        layer.lora_A.copy_(A2)
        layer.lora_B.copy_(B2)
        mags.past["0"].fill_(1.7)
        mags.past["1"].fill_(-0.6)
        mags.current.fill_(0.45)

    # hand reference: leaves of our own, the raw factors normalised here
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    a0, a1, ac = (torch.tensor(v, requires_grad=True) for v in (1.7, -0.6, 0.45))
    A2r, B2r = A2.clone().requires_grad_(True), B2.clone().requires_grad_(True)
    D = {t: raw[t][1] @ raw[t][0] / (raw[t][1].norm() * raw[t][0].norm()) for t in (0, 1)}
    x = torch.tensor([[1.0, 0.5, -1.0, 2.0, 0.3], [0.0, -0.7, 0.4, 1.1, -2.0], [0.9, 0.9, 0.9, -0.2, 0.1]])
    G = torch.tensor([[1.0, -2.0, 0.5, 0.3], [0.2, 0.1, -1.0, 2.0], [-0.4, 0.6, 0.8, -1.5]])
    want = x @ W.T + b + a0 * (x @ D[0].T) + a1 * (x @ D[1].T) + ac * 3.0 * (x @ (B2r @ A2r).T)

    with torch.no_grad():
        torch.testing.assert_close(layer(x), want.detach(), rtol=1e-5, atol=1e-5)
    got = layer(x)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    # the stored bank is the unit-norm direction of the raw factors (so s, or any scale, is normalised away)
    for t in (0, 1):
        torch.testing.assert_close(layer.bank_B[str(t)] @ layer.bank_A[str(t)], D[t])
        assert not layer.bank_A[str(t)].requires_grad and not layer.bank_B[str(t)].requires_grad

    (got * G).sum().backward()
    (want * G).sum().backward()
    torch.testing.assert_close(mags.past["0"].grad, a0.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mags.past["1"].grad, a1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mags.current.grad, ac.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, A2r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B2r.grad, rtol=1e-5, atol=1e-5)
    assert abs(a0.grad.item()) > 1e-3 and abs(a1.grad.item()) > 1e-3  # the past magnitudes do learn
    for t in (0, 1):
        assert layer.bank_A[str(t)].grad is None and layer.bank_B[str(t)].grad is None
    assert base.weight.grad is None and base.bias.grad is None


# -- class masking -------------------------------------------------------------------------------------------------

def test_mask_logits_keeps_values_puts_masked_below_and_passes_no_gradient():
    """``mask_logits`` against the official ``index_fill(not_mask, -inf)`` (HiDe-PET L44-52; the same in SD-LoRA,
    InfLoRA, CoDyRA): kept columns bit-identical, masked ones finite and strictly below every kept logit of their
    row, constants (no gradient from them to anything), and the cross-entropy that of the kept classes only."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 7.0],
                           [-4.0, 0.2, 9.0, 0.1, 0.0],
                           [100.0, -50.0, 1.0, -60.0, 2.0]], requires_grad=True)
    kept = [3, 1]  # unsorted on purpose
    out = mask_logits(logits, kept)
    assert out.shape == logits.shape and torch.isfinite(out).all()
    for i in range(3):
        for j in range(5):
            if j in kept:
                assert out[i, j].item() == logits[i, j].item()
            else:
                assert out[i, j].item() < min(logits[i, k].item() for k in kept)
    # the masked entries are constants: the gradient of their sum is zero everywhere
    (g,) = torch.autograd.grad(out[:, [0, 2, 4]].sum(), logits, retain_graph=True)
    assert torch.equal(g, torch.zeros_like(g))
    # and the whole output passes gradient 1 to the kept columns only
    (g,) = torch.autograd.grad(out.sum(), logits, retain_graph=True)
    assert g.tolist() == [[0, 1, 0, 1, 0]] * 3
    # loss and gradient of the cross-entropy are those over the kept classes alone
    y = torch.tensor([1, 3, 3])
    loss = nn.functional.cross_entropy(out, y)
    want = _hand_ce(logits, y, [kept] * 3)
    torch.testing.assert_close(loss, want)
    (g_lib,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_lib, g_ref)
    assert (g_lib[:, [0, 2, 4]] == 0).all()


def test_mask_logits_per_sample_current_and_replayed_rows():
    """``mask_logits_per_sample`` on a batch mixing the current experience's samples (classes {2, 5}) with replayed
    ones (classes 0, 3 of earlier experiences; seen = {0, 2, 3, 5}; 1 and 4 never trained): a current sample is
    scored over {2, 5}, a replayed one over every seen class. Kept sets written by hand per row; values, order,
    finiteness, gradient, and the cross-entropy against ``_hand_ce``."""
    torch.manual_seed(0)
    logits = (torch.randn(5, 6) * 3).requires_grad_(True)
    y = torch.tensor([5, 0, 2, 3, 2])
    kept_rows = [[2, 5], [0, 2, 3, 5], [2, 5], [0, 2, 3, 5], [2, 5]]
    out = mask_logits_per_sample(logits, y, current=[5, 2], seen=[3, 0, 2, 5])
    assert torch.isfinite(out).all()
    for i, kept in enumerate(kept_rows):
        low = min(logits[i, k].item() for k in kept)
        for j in range(6):
            if j in kept:
                assert out[i, j].item() == logits[i, j].item()
            else:
                assert out[i, j].item() < low, (i, j)
    (g,) = torch.autograd.grad(out.sum(), logits, retain_graph=True)
    assert g.tolist() == [[1.0 if j in kept else 0.0 for j in range(6)] for kept in kept_rows]
    loss = nn.functional.cross_entropy(out, y)
    want = _hand_ce(logits, y, kept_rows)
    torch.testing.assert_close(loss, want)
    (g_lib,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_lib, g_ref)


def test_masked_criterion_masks_in_training_only_and_the_mixin_wraps_it():
    """``MaskedCriterion``: in training with ``masked_loss`` the cross-entropy over each row's own experience's
    classes (by hand), in evaluation (and with ``masked_loss`` off, or before any class is known) the plain
    cross-entropy over every class (by hand). ``ClassMaskMixin.after_forward`` installs it only when the method
    masks; ``after_eval_forward`` restricts predictions to the seen classes."""
    logits = torch.tensor([[2.0, 0.5, 1.0, 4.0, -1.0, 3.0],
                           [0.1, 6.0, 0.2, 0.3, 0.4, 0.5],
                           [1.0, 1.0, 1.0, 1.0, 8.0, 1.0]])
    y = torch.tensor([2, 0, 3])  # current {2, 3}; sample 1 replayed (class 0); seen {0, 1, 2, 3}
    plugin = SimpleNamespace(masked_loss=True, _current_classes=[2, 3], seen_classes=[0, 1, 2, 3])
    strategy = SimpleNamespace(is_training=True)
    crit = MaskedCriterion(nn.CrossEntropyLoss(), plugin, strategy)
    masked = _hand_ce(logits, y, [[2, 3], [0, 1, 2, 3], [2, 3]])
    plain = _hand_ce(logits, y, [range(6)] * 3)
    assert masked.item() != pytest.approx(plain.item(), abs=1e-3)
    torch.testing.assert_close(crit(logits, y), masked)
    strategy.is_training = False
    torch.testing.assert_close(crit(logits, y), plain)
    strategy.is_training = True
    plugin.masked_loss = False
    torch.testing.assert_close(crit(logits, y), plain)
    plugin.masked_loss, plugin._current_classes = True, []
    torch.testing.assert_close(crit(logits, y), plain)

    # the mixin, on a real plugin: wraps the criterion once when masked_loss, never otherwise
    for masked_loss in (True, False):
        p = SDLoRAPlugin(target_modules="x", masked_loss=masked_loss)
        p._current_classes, p.seen_classes = [2, 3], [0, 1, 2, 3]
        s = SimpleNamespace(model=nn.Linear(3, 6), _criterion=nn.CrossEntropyLoss(), is_training=True,
                            mb_output=logits.clone())
        p.after_forward(s)
        p.after_forward(s)
        assert isinstance(s._criterion, MaskedCriterion) == masked_loss
        if masked_loss:
            assert isinstance(s._criterion.base, nn.CrossEntropyLoss)
            torch.testing.assert_close(s._criterion(logits, y), masked)
        # evaluation: classes of no trained experience (4, 5) never win; seen columns unchanged
        p.after_eval_forward(s)
        assert s.mb_output.argmax(1).tolist() == [3, 1, 0]
        assert torch.equal(s.mb_output[:, :4], logits[:, :4])


# masked_loss per method, written from the methods' docstrings (codyra, inflora, sd_lora, o_lora: "cross-entropy over
# the current experience's classes only"; hide_lora always masks and has no option; merge_lora and eblora train
# plain cross-entropy and have no option)
_MASKED_BY_DEFAULT = {"codyra": True, "inflora": True, "sd_lora": True, "o_lora": True}
_ALWAYS_MASKED = {"hide_lora"}
_NEVER_MASKED = {"merge_lora", "eblora"}


def _plugin_masks(cfg) -> bool:
    """Whether the strategy built from ``cfg`` (tiny ResNet, the CLI's own builder) trains with the masked loss."""
    from experiments.run import build_strategy
    from models import cifar_resnet

    strategy = build_strategy(cfg, cifar_resnet(20, 10), dict(train_mb_size=4, evaluator=EvaluationPlugin(loggers=[])))
    return bool(getattr(strategy.method_plugin, "masked_loss", False))


@pytest.mark.parametrize("method", sorted(set(_MASKED_BY_DEFAULT) | _ALWAYS_MASKED | _NEVER_MASKED))
def test_cli_masked_loss_default_and_flags_per_method(method):
    """``parse_config(["--method", m])`` gives each method its own ``masked_loss`` default, ``--masked-loss`` /
    ``--no-masked-loss`` override it and reach the plugin; methods without the option (HiDe-LoRA, which always
    masks, and the unmasked merge_lora / eblora) refuse both flags with an error naming the method."""
    from experiments.run import parse_config

    cfg = parse_config(["--method", method])
    if method in _MASKED_BY_DEFAULT:
        assert cfg["masked_loss"] is _MASKED_BY_DEFAULT[method]
        assert _plugin_masks(cfg) is _MASKED_BY_DEFAULT[method]
        for flag, value in (("--masked-loss", True), ("--no-masked-loss", False)):
            over = parse_config(["--method", method, flag])
            assert over["masked_loss"] is value
            assert _plugin_masks(over) is value
        return
    always = method in _ALWAYS_MASKED
    # not an option of this method; the config records what runs (HiDe-LoRA: masked)
    assert cfg["masked_loss"] is (True if always else None)
    assert _plugin_masks(cfg) is always
    if always:  # --masked-loss says what runs anyway; --no-masked-loss is refused, naming why
        assert parse_config(["--method", method, "--masked-loss"])["masked_loss"] is True
        with pytest.raises(ValueError, match=f"{method} always trains with the masked loss.*drop --no-masked-loss"):
            parse_config(["--method", method, "--no-masked-loss"])
        return
    for flag in ("--masked-loss", "--no-masked-loss"):
        with pytest.raises(ValueError, match=f"masked-loss is not an option of {method}"):
            parse_config(["--method", method, flag])
