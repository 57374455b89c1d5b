"""The defining computations of InfLoRA, EBLoRA and O-LoRA, recomputed independently on crafted small tensors.

Every expected value is written out here in plain torch / numpy from the official code (repository, commit, file
and lines cited in each test), never produced by a library helper: the library is only called for the value under
test. Small made models and tensors, no datasets, no pretrained weights; the plugins are driven through their hooks
with a minimal stand-in for the Avalanche strategy (the attributes the hooks read).
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from strategies import EBLoRAPlugin, InfLoRAPlugin, OLoRAPlugin, dualgpm_update, grow_subspace, orthogonality_loss

DT = torch.float64


# -- shared helpers ----------------------------------------------------------------------------------------------

class _Data(TensorDataset):
    """Stands for an Avalanche dataset: ``eval()`` (its eval transforms; none here) gives the same samples."""

    def eval(self):
        return self


def _strategy(model, x, y, exp=0, mb=4):
    """The attributes of a ``SupervisedTemplate`` the plugins' hooks read."""
    data = _Data(x, y, torch.zeros(len(x), dtype=torch.long))
    experience = SimpleNamespace(dataset=data, current_experience=exp,
                                 classes_in_this_experience=sorted(set(y.tolist())), origin_stream=[None] * 4)
    return SimpleNamespace(model=model, experience=experience, train_mb_size=mb, device="cpu",
                           optimizer=SimpleNamespace(state={}), _criterion=nn.CrossEntropyLoss())


def _orthonormal(n, k, gen, against=None):
    """``k`` random orthonormal columns in R^n (orthogonal to the columns of ``against``), float64."""
    m = torch.randn(n, k, generator=gen, dtype=DT)
    if against is not None:
        m = m - against @ (against.T @ m)
    q = torch.linalg.qr(m)[0]
    if against is not None:
        q = torch.linalg.qr(q - against @ (against.T @ q))[0]
    return q


def _proj(F):
    """Orthogonal projector on the span of the columns of ``F`` (sign- and order-free comparison of subspaces)."""
    F = torch.as_tensor(np.asarray(F)).to(DT) if not isinstance(F, torch.Tensor) else F.to(DT)
    return F @ F.T


def _assert_rows_up_to_sign(A, R, atol):
    """Row i of ``A`` equals ``±`` row i of ``R`` (singular vectors are defined up to sign)."""
    A, R = A.to(DT), R.to(DT)
    assert A.shape == R.shape
    for i in range(A.shape[0]):
        sign = 1.0 if float(A[i] @ R[i]) >= 0 else -1.0
        torch.testing.assert_close(A[i], sign * R[i], atol=atol, rtol=0, msg=f"row {i}")


def _svd_polar(M):
    """Orthonormal polar factor ``U_svd V_svdᵀ`` (``polar_uf``, haodotgu/EBLoRA llava/train/stiefel.py L67-71)."""
    u, _, vh = torch.linalg.svd(M.to(DT), full_matrices=False)
    return u @ vh


# ================================================================================================================
# InfLoRA (Liang & Li, CVPR 2024; liangyanshuo/InfLoRA @ e08b00e)
# ================================================================================================================

class _ConvTokens(nn.Module):
    """A 3×3 stride-2 conv, its output positions as tokens ``(B, N, d)`` through a Linear (the ViT case), a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.head(torch.relu(self.fc(h.flatten(2).transpose(1, 2))).mean(1))


def _patches(x, k=3, stride=2, pad=1):
    """Every k×k patch of ``x`` (zero padded), flattened channel-major ``(c, i, j)`` as a Conv2d weight is, one row
    per (image, output position): written with explicit slices, not ``F.unfold``."""
    B, C, H, W = x.shape
    xp = torch.zeros(B, C, H + 2 * pad, W + 2 * pad, dtype=DT)
    xp[:, :, pad:pad + H, pad:pad + W] = x.to(DT)
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    return torch.stack([xp[b, :, i * stride:i * stride + k, j * stride:j * stride + k].reshape(-1)
                        for b in range(B) for i in range(Ho) for j in range(Wo)])


def _inflora_setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _ConvTokens()
    w_conv = model.conv.weight.detach().to(DT).reshape(6, -1).clone()
    b_conv = model.conv.bias.detach().to(DT).clone()
    # anisotropic inputs: well separated leading eigenvalues, so singular vectors are well defined
    x = torch.randn(10, 2, 5, 5, generator=gen) * torch.tensor([2.0, 0.5]).view(1, 2, 1, 1) + 0.3
    y = torch.arange(10) % 5
    plugin = InfLoRAPlugin(target_modules=["conv", "fc"], r=2, n_tasks=3)
    plugin.prepare(model)
    return model, plugin, x, y, (w_conv, b_conv)


def _inflora_reference_covariances(x, w_conv, b_conv):
    """``cur_matrix`` of models/vit_inflora.py L237 (in ``Attention_LoRA.forward``, L236-238): the running mean of
    ``xᵀx`` over every token of every image, ``Σ x xᵀ / #tokens``; a conv's tokens are its k×k input patches. The
    Linear's tokens are the conv's outputs (its LoRA branch is zero before any task), computed from the patches."""
    P = _patches(x)  # (10·9, 18)
    T = torch.relu(P @ w_conv.T + b_conv)  # (10·9, 6): the tokens the Linear sees
    return {"conv": P.T @ P / len(P), "fc": T.T @ T / len(T)}


def test_inflora_covariance_is_mean_x_xT_over_every_token_and_conv_patch():
    """The covariance the plugin accumulates (mini-batches of 4, 4 and 2 images) equals Σ xᵀx / N over all N
    tokens (conv: k×k patches of the zero-padded input, channel-major), as the official running mean
    ``(M·n + Σ xᵀx) / (n + B·N)`` (liangyanshuo/InfLoRA models/vit_inflora.py L237). A sum instead of the mean, a
    mean of per-batch means, a division by images instead of tokens, or a patch order that does not match the conv
    weight's, all fail."""
    model, plugin, x, y, (w_conv, b_conv) = _inflora_setup()
    covs = plugin.input_covariances(_strategy(model, x, y, mb=4))
    ref = _inflora_reference_covariances(x, w_conv, b_conv)
    assert set(covs) == {"conv", "fc"}
    for name in ("conv", "fc"):
        assert covs[name].shape == ref[name].shape
        torch.testing.assert_close(covs[name].to(DT), ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_inflora_designed_A_is_top_singular_vectors_of_projected_covariance_over_sqrt3():
    """Designed A (methods/inflora.py @ e08b00e L127 on the first task, L149-L154 after it):
    ``A = U[:, :r]ᵀ / sqrt(3)`` with U the left singular vectors of ``H`` (task 0), of ``H - M H`` for a "remove"
    layer and of ``M H`` for a "retain" one, ``M = F Fᵀ``. Recomputed with ``torch.linalg.eigh`` / ``svd`` on the
    hand-made covariance; rows compared up to sign, their norm 1/sqrt(3) exactly. B restarts at zero."""
    model, plugin, x, y, (w_conv, b_conv) = _inflora_setup()
    H = _inflora_reference_covariances(x, w_conv, b_conv)
    s = _strategy(model, x, y, exp=0, mb=4)
    plugin.before_training_exp(s)
    for name, layer in (("conv", model.conv), ("fc", model.fc)):
        A = layer.lora_A.detach().reshape(2, -1).to(DT)
        lam, vecs = torch.linalg.eigh(H[name])
        assert float(lam[-2] - lam[-3]) > 1e-2 * float(lam[-1]), "test data: top eigenvalues must be separated"
        ref = vecs[:, [-1, -2]].T / math.sqrt(3)
        torch.testing.assert_close(A.norm(dim=1), torch.full((2,), 1 / math.sqrt(3), dtype=DT), atol=1e-6, rtol=0)
        _assert_rows_up_to_sign(A, ref, atol=1e-5)
        assert layer.current_task == 0 and not layer.lora_A.requires_grad
    # task 1: earlier bases set by hand, one layer of each kind
    gen = torch.Generator().manual_seed(1)
    F_conv = _orthonormal(18, 5, gen)  # "remove": spans protected inputs
    F_fc = _orthonormal(6, 4, gen)  # "retain": spans the allowed inputs
    plugin.subspaces = {"conv": F_conv.float(), "fc": F_fc.float()}
    plugin.subspace_kinds = {"conv": "remove", "fc": "retain"}
    with torch.no_grad():  # the last adapted layer's B (it changes no adapted layer's input) must restart at 0
        model.fc.lora_B.fill_(1.0)
    x1 = torch.randn(10, 2, 5, 5, generator=gen) * torch.tensor([0.7, 1.8]).view(1, 2, 1, 1) - 0.2
    H1 = _inflora_reference_covariances(x1, w_conv, b_conv)
    plugin.before_training_exp(_strategy(model, x1, y, exp=1, mb=3))
    projected = {"conv": H1["conv"] - F_conv @ (F_conv.T @ H1["conv"]),  # L149
                 "fc": F_fc @ (F_fc.T @ H1["fc"])}  # L152
    for name, layer in (("conv", model.conv), ("fc", model.fc)):
        U, S, _ = torch.linalg.svd(projected[name])
        assert float(S[1] - S[2]) > 1e-2 * float(S[0]), "test data: top singular values must be separated"
        A = layer.lora_A.detach().reshape(2, -1).to(DT)
        _assert_rows_up_to_sign(A, U[:, :2].T / math.sqrt(3), atol=1e-5)
        assert layer.current_task == 1 and float(layer.lora_B.detach().abs().max()) == 0.0
    # consequences: the conv's A rows avoid its protected span, the Linear's rows lie inside its allowed span
    assert float((model.conv.lora_A.detach().reshape(2, -1).to(DT) @ F_conv).abs().max()) < 1e-6
    A_fc = model.fc.lora_A.detach().reshape(2, -1).to(DT)
    assert float((A_fc - A_fc @ F_fc @ F_fc.T).abs().max()) < 1e-6


def test_inflora_designed_A_stays_in_the_allowed_space_when_it_is_smaller_than_r():
    """A "retain" basis of one direction at r = 2: the projected covariance has rank 1, so its second singular
    vector is arbitrary (orthogonal to the allowed direction). The designed A must still lie inside the allowed span
    (its second row vanishes): B A may touch no protected input direction."""
    model, plugin, x, y, _ = _inflora_setup()
    plugin.before_training_exp(_strategy(model, x, y, exp=0, mb=4))
    gen = torch.Generator().manual_seed(2)
    F_fc = _orthonormal(6, 1, gen)
    plugin.subspaces = {"conv": _orthonormal(18, 5, gen).float(), "fc": F_fc.float()}
    plugin.subspace_kinds = {"conv": "remove", "fc": "retain"}
    plugin.before_training_exp(_strategy(model, x, y, exp=1, mb=3))
    A = model.fc.lora_A.detach().reshape(2, -1).to(DT)
    assert float((A - A @ F_fc @ F_fc.T).abs().max()) < 1e-6
    assert float(A.norm(dim=1).max()) == pytest.approx(1 / math.sqrt(3), abs=1e-5)  # the allowed row keeps its norm


def _official_dualgpm(feature, kind, act, threshold):
    """``update_DualGPM`` of liangyanshuo/InfLoRA @ e08b00e methods/inflora.py L321-396 for one layer, in numpy.
    Returns ``(feature, kind, r)``; a first-task basis of r >= d/2 directions is returned as its *protected* span
    ``U[:, :r]`` with kind "protect-large" (see the test on the library's complement form)."""
    act = np.asarray(act, dtype=np.float64)
    if feature is None:  # L324-338
        U, S, _ = np.linalg.svd(act, full_matrices=False)
        sval_ratio = S ** 2 / (S ** 2).sum()
        r = int(np.sum(np.cumsum(sval_ratio) < threshold))
        if r < act.shape[0] / 2:
            return U[:, :max(r, 1)], "remove", r
        return U[:, :max(r, 1)], "protect-large", r
    S1 = np.linalg.svd(act, compute_uv=False)
    sval_total = (S1 ** 2).sum()
    if kind == "remove":  # L341-368
        act_hat = act - feature @ feature.T @ act
        U, S, _ = np.linalg.svd(act_hat, full_matrices=False)
        sval_ratio = S ** 2 / sval_total
        accumulated = (sval_total - (S ** 2).sum()) / sval_total
        r = 0
        for ii in range(sval_ratio.shape[0]):
            if accumulated < threshold:
                accumulated += sval_ratio[ii]
                r += 1
            else:
                break
        if r == 0:
            return feature, kind, 0
        Ui = np.hstack((feature, U[:, :r]))
        return Ui[:, :Ui.shape[0]], kind, r
    # "retain" (L369-396): feature spans the allowed space
    act_hat = feature @ feature.T @ act
    U, S, _ = np.linalg.svd(act_hat, full_matrices=False)
    sval_ratio = S ** 2 / sval_total
    accumulated = (S ** 2).sum() / sval_total
    r = 0
    for ii in range(sval_ratio.shape[0]):
        if accumulated >= (1 - threshold):
            accumulated -= sval_ratio[ii]
            r += 1
        else:
            break
    if r == 0:
        return feature, kind, 0
    act_feature = feature - U[:, :r] @ U[:, :r].T @ feature
    Ui = np.linalg.svd(act_feature)[0]
    return Ui[:, :feature.shape[1] - r], kind, r


def _spectrum_matrix(energies, basis):
    """Symmetric PSD ``H = Q diag(σ) Qᵀ`` whose squared singular values (DualGPM's energies) are ``energies``."""
    sig = torch.tensor(energies, dtype=DT).sqrt()
    return basis @ torch.diag(sig) @ basis.T


@pytest.mark.parametrize("threshold", [0.2, 0.55])
def test_dualgpm_growth_on_a_wide_layer_matches_the_official_code(threshold):
    """d = 80: the library computes a "remove" basis's growth from the top 32 eigenpairs first and all of them
    only when those fall short (threshold 0.55 needs more than 32 new directions, 0.2 fewer); either way the
    result is the official code's (numpy, full SVD)."""
    gen = torch.Generator().manual_seed(4)
    d = 80
    e1 = [60.0, 30.0, 20.0] + list(np.linspace(0.5, 0.01, d - 3))
    H1 = _spectrum_matrix(e1, _orthonormal(d, d, gen))
    F_ref, kind_ref, r1 = _official_dualgpm(None, None, H1.numpy(), 0.8)
    F1, kind1 = dualgpm_update(None, None, H1, 0.8)
    assert kind_ref == kind1 == "remove" and F1.shape[1] == r1 < 10
    H2 = _spectrum_matrix(list(np.linspace(2.0, 1.0, d)), _orthonormal(d, d, gen))
    F2_ref, _, r2 = _official_dualgpm(F_ref, "remove", H2.numpy(), threshold)
    assert (r2 > 32) == (threshold == 0.55) and F2_ref.shape[1] < d / 2
    F2, kind2 = dualgpm_update(F1, kind1, H2, threshold)
    assert kind2 == "remove" and F2.shape == F2_ref.shape
    torch.testing.assert_close(_proj(F2), _proj(F2_ref), atol=1e-7, rtol=0)


def test_dualgpm_update_matches_the_official_energy_criterion():
    """DualGPM (methods/inflora.py L321-396) recomputed in numpy on crafted covariances with known energies:
    first task ``r = #(cumsum(σ²)/Σσ² < eps)`` (L332, no +1), later "remove" layers grown by the top residual
    directions until the captured energy reaches eps (L341-368), "retain" layers shrunk while the energy left in
    the allowed space is >= 1 - eps (L369-396). Subspaces compared by their projectors, sizes exactly."""
    gen = torch.Generator().manual_seed(2)
    d = 10
    Q = _orthonormal(d, d, gen)
    # energies (sum 100): cumulative 40, 65, 80, 90, 94, 97, 98.5, 99.5, 99.8, 100
    e1 = [40, 25, 15, 10, 4, 3, 1.5, 1, 0.3, 0.2]
    H1 = _spectrum_matrix(e1, Q)
    F_ref, kind_ref, r = _official_dualgpm(None, None, H1.numpy(), 0.85)
    assert (kind_ref, r) == ("remove", 3)  # 0.40, 0.65, 0.80 < 0.85 (a +1 convention would keep 4)
    F1, kind1 = dualgpm_update(None, None, H1, 0.85)
    assert kind1 == "remove" and F1.shape == (d, 3)
    torch.testing.assert_close(_proj(F1), _proj(F_ref), atol=1e-8, rtol=0)

    # second task, "remove": grow by the residual's top directions
    Q2 = _orthonormal(d, d, gen)
    H2 = _spectrum_matrix([30, 20, 12, 9, 7, 5, 3, 2, 1, 0.5], Q2)
    F2_ref, _, r2 = _official_dualgpm(F_ref, "remove", H2.numpy(), 0.6)
    assert r2 == 1 and F2_ref.shape[1] == 4  # stays below d/2: the library keeps the "remove" form too
    F2, kind2 = dualgpm_update(F1, kind1, H2, 0.6)
    assert kind2 == "remove" and F2.shape == (d, 4)
    torch.testing.assert_close(_proj(F2), _proj(F2_ref), atol=1e-8, rtol=0)
    torch.testing.assert_close(_proj(F2[:, :3]), _proj(F1), atol=1e-10, rtol=0)  # earlier directions kept first

    # third task, "remove" grows past d/2: the library stores the complement as "retain" (documented deviation;
    # the official code keeps "remove" with the larger basis), so the allowed space is I - F_ref F_refᵀ
    F3_ref, _, r3 = _official_dualgpm(F2_ref, "remove", H2.numpy() + H1.numpy(), 0.97)
    assert F3_ref.shape[1] > d / 2 and r3 >= 2
    F3, kind3 = dualgpm_update(F2, kind2, H2 + H1, 0.97)
    assert kind3 == "retain" and F3.shape == (d, d - F3_ref.shape[1])
    torch.testing.assert_close(_proj(F3), torch.eye(d, dtype=DT) - _proj(F3_ref), atol=1e-8, rtol=0)

    # "retain" update (official L369-396), from an allowed space of 6 directions
    A_allowed = _orthonormal(d, 6, gen)
    H4 = _spectrum_matrix([50, 20, 10, 8, 5, 3, 2, 1, 0.6, 0.4], _orthonormal(d, d, gen))
    F4_ref, _, r4 = _official_dualgpm(A_allowed.numpy(), "retain", H4.numpy(), 0.8)
    assert 0 < r4 < 6
    F4, kind4 = dualgpm_update(A_allowed, "retain", H4, 0.8)
    assert kind4 == "retain" and F4.shape == (d, 6 - r4)
    torch.testing.assert_close(_proj(F4), _proj(F4_ref), atol=1e-8, rtol=0)

    # a first task needing r >= d/2 directions: protected U[:, :r], allowed (stored, "retain") its complement
    H5 = _spectrum_matrix([12, 11, 11, 10, 10, 10, 9, 9, 9, 9], Q)
    P5, kind5_ref, r5 = _official_dualgpm(None, None, H5.numpy(), 0.7)
    assert kind5_ref == "protect-large" and r5 == 6
    F5, kind5 = dualgpm_update(None, None, H5, 0.7)
    assert kind5 == "retain" and F5.shape == (d, d - r5)
    torch.testing.assert_close(_proj(F5), torch.eye(d, dtype=DT) - _proj(P5), atol=1e-8, rtol=0)


def test_inflora_after_training_exp_uses_the_threshold_schedule():
    """After experience t the threshold is ``(lame - lamb)·t/T + lamb`` (methods/inflora.py L322, in
    update_DualGPM); here lamb 0.5, lame 0.9, T 4, t 2: eps 0.7, which keeps 2 directions of the crafted
    spectrum (cumulative 0.40, 0.65, 0.75, ...), where lamb keeps 1, t/(T-1) keeps 3, lame keeps 4. The layer's
    branch is then frozen into its bank."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(10, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.fc(x))

    model = Net()
    plugin = InfLoRAPlugin(target_modules=["fc"], r=2, lamb=0.5, lame=0.9, n_tasks=4)
    plugin.prepare(model)
    gen = torch.Generator().manual_seed(3)
    Q = _orthonormal(10, 10, gen)
    H = _spectrum_matrix([40, 25, 10, 8, 7, 4, 3, 1.5, 1, 0.5], Q)
    plugin.input_covariances = lambda strategy: {"fc": H.clone()}  # the covariance pass is tested above
    s = _strategy(model, torch.zeros(3, 10), torch.arange(3), exp=2)
    model.fc.current_task = 2
    plugin.after_training_exp(s)
    eps = (0.9 - 0.5) * 2 / 4 + 0.5
    assert plugin.subspace_history[-1]["threshold"] == pytest.approx(eps)
    F_ref, kind_ref, r = _official_dualgpm(None, None, H.numpy(), eps)
    assert r == 2 and kind_ref == "remove"
    assert plugin.subspace_kinds["fc"] == "remove" and plugin.subspaces["fc"].shape == (10, 2)
    torch.testing.assert_close(_proj(plugin.subspaces["fc"]), _proj(F_ref), atol=1e-6, rtol=0)
    assert plugin.subspace_history[-1]["protected"] == {"fc": 2}
    assert "2" in model.fc.bank_A and model.fc.current_task is None  # the branch is frozen into the bank


# ================================================================================================================
# EBLoRA (Gu, Luo et al., ICML 2026; haodotgu/EBLoRA @ 5585607)
# ================================================================================================================

def _official_gpm_energy(feature, act, threshold):
    """The 'energy' branch of haodotgu/EBLoRA @ 5585607 llava/train/extract_gradients.py L280-344, in numpy;
    ``act = Gᵀ`` (d_in × d_out), ``feature`` the basis as columns (the code stores its transpose). Returns
    ``(basis, r added)``."""
    act = np.asarray(act, dtype=np.float64)
    U1, S1, _ = np.linalg.svd(act, full_matrices=False)
    sval_total = (S1 ** 2).sum()
    if feature is None:  # L331-344: the smallest rank whose cumulative energy reaches the threshold (+1 convention)
        energy_ratio = np.cumsum(S1 ** 2) / sval_total
        k = int(np.nonzero(energy_ratio >= threshold)[0][0]) + 1
        return U1[:, :k], k
    act_hat = act - feature @ (feature.T @ act)  # L296
    U, S, _ = np.linalg.svd(act_hat, full_matrices=False)
    sval_ratio = S ** 2 / sval_total
    accumulated = (sval_total - (S ** 2).sum()) / sval_total
    r = 0
    for ii in range(sval_ratio.shape[0]):  # L307-313
        if accumulated < threshold:
            accumulated += sval_ratio[ii]
            r += 1
        else:
            break
    if r == 0:
        return feature, 0
    Ui = np.hstack((feature, U[:, :r]))
    return Ui[:, :Ui.shape[0]], r


def _matrix_with_singular_values(sv, left, right):
    return left @ torch.diag(torch.tensor(sv, dtype=DT)) @ right.T


def test_eblora_gradient_subspace_grows_by_the_official_energy_rule():
    """``grow_subspace`` against extract_gradients.py L280-344 on a crafted ``Gᵀ`` (9 × 7) with energies 50, 20,
    12, 8, 5, 3, 2 (cumulative 0.50, 0.70, 0.82, 0.90, ...): at 0.85 the first task keeps 4 directions (the smallest
    rank reaching the threshold; InfLoRA's ``#(cumsum < eps)`` would keep 3). A second task then adds the residual's
    top directions until the captured energy of its own Gᵀ reaches the threshold."""
    gen = torch.Generator().manual_seed(4)
    d_in, d_out = 9, 7
    Gt = _matrix_with_singular_values([50 ** .5, 20 ** .5, 12 ** .5, 8 ** .5, 5 ** .5, 3 ** .5, 2 ** .5],
                                      _orthonormal(d_in, 7, gen), _orthonormal(d_out, 7, gen))
    F_ref, k = _official_gpm_energy(None, Gt.numpy(), 0.85)
    assert k == 4
    F1 = grow_subspace(torch.zeros(d_in, 0, dtype=DT), Gt, 0.85)
    assert F1.shape == (d_in, 4)
    torch.testing.assert_close(_proj(F1), _proj(F_ref), atol=1e-8, rtol=0)
    torch.testing.assert_close(F1.T @ F1, torch.eye(4, dtype=DT), atol=1e-10, rtol=0)
    # second task: part of its gradient in the old span, part outside
    new_dirs = _orthonormal(d_in, 3, gen, against=F1)
    Gt2 = F1[:, :2] @ torch.randn(2, d_out, generator=gen, dtype=DT) * 2 \
        + new_dirs @ torch.diag(torch.tensor([3.0, 1.5, 0.4], dtype=DT)) @ torch.randn(3, d_out, generator=gen,
                                                                                         dtype=DT)
    F2_ref, r2 = _official_gpm_energy(F_ref, Gt2.numpy(), 0.95)
    assert r2 >= 1 and F2_ref.shape[1] < d_in
    F2 = grow_subspace(F1, Gt2, 0.95)
    assert F2.shape == (d_in, F2_ref.shape[1])
    torch.testing.assert_close(_proj(F2), _proj(F2_ref), atol=1e-8, rtol=0)
    torch.testing.assert_close(_proj(F2[:, :4]), _proj(F1), atol=1e-10, rtol=0)
    # nothing added when the old span already holds the threshold's energy (official r == 0, L315-319)
    Gt3 = F1 @ torch.randn(4, d_out, generator=gen, dtype=DT) + 1e-3 * torch.randn(d_in, d_out, generator=gen,
                                                                                     dtype=DT)
    assert _official_gpm_energy(F_ref, Gt3.numpy(), 0.95)[1] == 0
    assert grow_subspace(F1, Gt3, 0.95).shape == (d_in, 4)


class _TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(9, 7)
        self.fc2 = nn.Linear(7, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_eblora_mean_gradient_is_the_analytic_cross_entropy_gradient():
    """The gradient EBLoRA decomposes: the mean loss gradient w.r.t. the frozen weight (extract_gradients.py,
    averaged), here through the adapter in place (ΔW = 2·s·U Vᵀ). For a Linear producing the logits,
    ``dL/dW = (softmax(z) - onehot)ᵀ x / n`` with ``z = x (W + ΔW)ᵀ + b``, written out by hand; mini-batches of
    4, 4, 2 samples (each batch's mean weighted by its size)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(5)
    model = Net()
    plugin = EBLoRAPlugin(target_modules=["fc"], r=2, grad_fraction=1.0, trainable_modules=None)
    plugin.prepare(model)
    layer = model.fc
    gen = torch.Generator().manual_seed(5)
    U, V = _orthonormal(5, 2, gen), _orthonormal(6, 2, gen)
    layer.set_factors(U.float(), V.float())
    with torch.no_grad():
        layer.lora_scale.fill_(0.4)
    x = torch.randn(10, 6, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    G = plugin.mean_gradients(_strategy(model, x, y, mb=4))[0]
    W = layer.base_layer.weight.detach().to(DT) + 2 * 0.4 * U @ V.T
    z = x.to(DT) @ W.T + layer.base_layer.bias.detach().to(DT)
    p = torch.softmax(z, 1)
    onehot = torch.zeros(10, 5, dtype=DT)
    onehot[torch.arange(10), y] = 1
    G_ref = (p - onehot).T @ x.to(DT) / 10
    torch.testing.assert_close(G.to(DT), G_ref, atol=1e-6, rtol=1e-5)
    assert not layer.base_layer.weight.requires_grad and layer.base_layer.weight.grad is None


def _eblora_init_setup():
    """Two adapted Linears (9 → 7 with a protected F of 2 directions, 7 → 5 without), r = 3, alpha0 0.1, beta0 0.2,
    and crafted mean gradients with separated spectra (fc1's also holds a strong component inside F that the
    projection must drop). Runs ``before_training_exp``; returns the model, the strategy stand-in and, per layer,
    ``(Gᵀ, F)``."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = _TwoLinear()
    plugin = EBLoRAPlugin(target_modules=["fc1", "fc2"], r=3, alpha0=0.1, beta0=0.2)
    plugin.prepare(model)
    F = _orthonormal(9, 2, gen)
    model.fc1.subspace = F.float()
    P0 = _orthonormal(9, 5, gen, against=F)
    Gt1 = _matrix_with_singular_values([9.0, 6.0, 4.0, 0.5, 0.2], P0, _orthonormal(7, 5, gen)) \
        + F @ torch.randn(2, 7, generator=gen, dtype=DT) * 20
    Gt2 = _matrix_with_singular_values([5.0, 3.0, 2.0, 0.3, 0.1], _orthonormal(7, 5, gen),
                                       _orthonormal(5, 5, gen))
    plugin.mean_gradients = lambda strategy: [Gt1.T.float().clone(), Gt2.T.float().clone()]  # tested above
    s = _strategy(model, torch.zeros(2, 9), torch.arange(2))
    s.optimizer.state = {model.fc1.lora_A: {"exp_avg": 1}, model.fc2.lora_scale: {"exp_avg": 1}}
    plugin.before_training_exp(s)
    return model, s, ((model.fc1, Gt1, F), (model.fc2, Gt2, None))


def _reference_init(Gt, F):
    """``Gᵀ - F Fᵀ Gᵀ = P S Qᵀ`` (extract_gradients.py L267-270), full ``torch.linalg.svd``: ``(P_r, Q_r)``."""
    proj = Gt - F @ (F.T @ Gt) if F is not None else Gt
    P, _, Qh = torch.linalg.svd(proj, full_matrices=False)
    return P[:, :3], Qh[:3].T


def test_eblora_svd_init_spans_the_top_r_singular_subspaces_of_the_projected_gradient_and_depth_scale():
    """Initialisation (extract_gradients.py L262-277; train.py ``initialize_lora_weights_custom`` copies
    ``svd_result = Uᵀ`` into A and ``svd_result_V = V`` into B): the mean gradient's transpose projected off F
    (``Gᵀ - F Fᵀ Gᵀ``, L267), ``svd_lowrank(·, q=r) = P S Qᵀ``, A = Pᵀ, B = Q. Recomputed with a full
    ``torch.linalg.svd``; V spans P_r, U spans Q_r (projectors: sign free), both orthonormal, V ⟂ F. The magnitude
    starts at ``-(alpha0 + beta0·l/(L-1))`` (train.py ``compute_scale_fn`` L138-139; the library counts adapted
    layers instead of the code's 32 blocks). The previous task's optimizer moments are dropped."""
    model, s, layers = _eblora_init_setup()
    for layer, Gt, F in layers:
        P_r, Q_r = _reference_init(Gt, F)
        U, V = layer.U().detach().to(DT), layer.V().detach().to(DT)
        torch.testing.assert_close(_proj(V), _proj(P_r), atol=1e-5, rtol=0)
        torch.testing.assert_close(_proj(U), _proj(Q_r), atol=1e-5, rtol=0)
        torch.testing.assert_close(V.T @ V, torch.eye(3, dtype=DT), atol=1e-5, rtol=0)
        torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=DT), atol=1e-5, rtol=0)
        if F is not None:
            assert float((F.T @ V).abs().max()) < 1e-6
    assert float(model.fc1.lora_scale.detach()) == pytest.approx(-0.1)
    assert float(model.fc2.lora_scale.detach()) == pytest.approx(-(0.1 + 0.2 * 1 / 1))
    assert s.optimizer.state == {}


def test_eblora_svd_init_pairs_U_and_V_as_the_gradient_svd():
    """The pairing of the factors: the official B A = V_svd U_svdᵀ from one ``svd_lowrank`` call is ``Q_r P_rᵀ``,
    the top-r direction of the projected gradient ``G = Q S Pᵀ`` with a flat spectrum (so that s < 0, as
    ``compute_scale_fn`` sets it, descends along every component). Per-vector signs are free, the product is not:
    ``U Vᵀ`` must equal ``Q_r P_rᵀ``, i.e. ``<G_proj, U Vᵀ> = Σ_{i<=r} σ_i``."""
    _, _, layers = _eblora_init_setup()
    for layer, Gt, F in layers:
        P_r, Q_r = _reference_init(Gt, F)
        U, V = layer.U().detach().to(DT), layer.V().detach().to(DT)
        torch.testing.assert_close(U @ V.T, Q_r @ P_r.T, atol=1e-5, rtol=0)


class _Net(nn.Module):
    """A Linear ``fc`` (adapted) and a 2-class head."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.head = nn.Linear(d_out, 2)


def test_eblora_riemannian_step_with_protected_subspace_written_out():
    """One step of RiemannianAdamW (llava/train/riemannian_adam.py @ 5585607) on a 7 → 9 Linear, r = 3, with a
    protected F (7 × 2) on V: ``pre_step`` (L79-113) turns the gradients into ``gU - U (gUᵀ U)`` and, for V,
    ``g ← g - F Fᵀ g`` then ``g - V (gᵀ V)`` (stiefel.py L15-25); ``post_step`` (L116-159) takes the optimizer's
    move D, ``D /= sqrt(r / 4096)`` (L142-143, the trainer's ``grad_scaling = 4096.``), projects it
    (``tangent_project_*``, stiefel.py L33-42: F first for V) and retracts with the polar factor of ``X + D``, F
    removed first for V (L84-90). The optimizer's move is made by hand (a non-tangent random one)."""
    gen = torch.Generator().manual_seed(7)

    model = _Net(7, 9)
    plugin = EBLoRAPlugin(target_modules=["fc"], r=3)
    plugin.prepare(model)
    layer = model.fc
    F = _orthonormal(7, 2, gen)
    layer.subspace = F.float()
    U0, V0 = _orthonormal(9, 3, gen), _orthonormal(7, 3, gen, against=F)
    layer.set_factors(U0.float(), V0.float())
    U0, V0 = layer.U().detach().to(DT).clone(), layer.V().detach().to(DT).clone()  # as stored (float32)
    Ff = F.float().to(DT)
    gB = torch.randn(9, 3, generator=gen)
    gA = torch.randn(3, 7, generator=gen)
    layer.lora_B.grad = gB.clone()
    layer.lora_A.grad = gA.clone()
    s = SimpleNamespace(model=model)
    plugin.before_update(s)
    gU = gB.to(DT)
    torch.testing.assert_close(layer.lora_B.grad.to(DT), gU - U0 @ (gU.T @ U0), atol=1e-5, rtol=0)
    gV = gA.T.to(DT)
    gV = gV - Ff @ (Ff.T @ gV)
    gV = gV - V0 @ (gV.T @ V0)
    torch.testing.assert_close(layer.lora_A.grad.T.to(DT), gV, atol=1e-5, rtol=0)
    # the optimizer's move, by hand
    mB = 1e-3 * torch.randn(9, 3, generator=gen)
    mA = 1e-3 * torch.randn(3, 7, generator=gen)
    with torch.no_grad():
        layer.lora_B.add_(mB)
        layer.lora_A.add_(mA)
    U1, V1 = layer.U().detach().to(DT).clone(), layer.V().detach().to(DT).clone()
    plugin.after_update(s)
    c = 1 / math.sqrt(3 / 4096.0)  # delta.div_(sqrt(shape[1] / c)), shape[1] = r = 3
    D = (U1 - U0) * c
    D = D - U0 @ (D.T @ U0)
    U_ref = _svd_polar(U0 + D)
    D = (V1 - V0) * c
    D = D - Ff @ (Ff.T @ D)
    D = D - V0 @ (D.T @ V0)
    M = V0 + D
    M = M - Ff @ (Ff.T @ M)
    V_ref = _svd_polar(M)
    torch.testing.assert_close(layer.U().detach().to(DT), U_ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(layer.V().detach().to(DT), V_ref, atol=2e-6, rtol=0)
    assert float((layer.V().detach().to(DT) - V0).norm()) > 1e-3  # the rescaled step really moved V


def test_eblora_end_of_task_merges_2_s_UVt_and_grows_F_from_the_merged_gradient():
    """End of task: merge ``W ← W + (alpha/r)·s·B A`` with alpha = 2r (the PEFT layer's ``scaling · lora_scale``,
    llava/peft/tuners/lora.py L827-829), then F grown from the gradient (extract_gradients.py energy rule, here the
    first task: the smallest rank reaching 0.85), s back to 0."""
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(8)

    model = _Net(9, 7)
    plugin = EBLoRAPlugin(target_modules=["fc"], r=3, energy_threshold=0.85)
    plugin.prepare(model)
    layer = model.fc
    U, V = _orthonormal(7, 3, gen), _orthonormal(9, 3, gen)
    layer.set_factors(U.float(), V.float())
    with torch.no_grad():
        layer.lora_scale.fill_(-0.3)
    W0 = layer.base_layer.weight.detach().to(DT).clone()
    Gt = _matrix_with_singular_values([50 ** .5, 20 ** .5, 12 ** .5, 8 ** .5, 5 ** .5, 3 ** .5, 2 ** .5],
                                      _orthonormal(9, 7, gen), _orthonormal(7, 7, gen))
    seen = {}

    def grads(strategy):
        seen["merged"] = layer.base_layer.weight.detach().to(DT).clone()
        return [Gt.T.float().clone()]

    plugin.mean_gradients = grads
    plugin.after_training_exp(_strategy(model, torch.zeros(2, 9), torch.arange(2)))
    W_ref = W0 + 2 * (-0.3) * U @ V.T
    torch.testing.assert_close(seen["merged"], W_ref, atol=1e-6, rtol=0)  # gradient taken on the merged model
    torch.testing.assert_close(layer.base_layer.weight.detach().to(DT), W_ref, atol=1e-6, rtol=0)
    F_ref, k = _official_gpm_energy(None, Gt.numpy(), 0.85)
    assert k == 4 and layer.subspace.shape == (9, 4)
    torch.testing.assert_close(_proj(layer.subspace), _proj(F_ref), atol=1e-5, rtol=0)
    assert float(layer.lora_scale.detach()) == 0.0 and plugin.subspace_history[-1] == {"fc": 4}


# ================================================================================================================
# O-LoRA (Wang et al., EMNLP Findings 2023; cmnfriend/O-LoRA @ 07117e1)
# ================================================================================================================

class _OLoRANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.l1 = nn.Linear(7, 5)
        self.l2 = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)


def _olora_three_tasks(lambda_orth, lambda_l2):
    """Tasks 0 and 1 stored with random (not unit) factors, task 2 current with random factors. Returns the model,
    plugin, strategy stand-in and the factors {layer: [A0, A1, A2]}, {layer: B2}."""
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    model = _OLoRANet()
    plugin = OLoRAPlugin(target_modules=["c", "l1", "l2"], r=2, dropout=0.0, lambda_orth=lambda_orth,
                         lambda_l2=lambda_l2)
    plugin.prepare(model)
    names = ("c", "l1", "l2")
    As, Bs = {n: [] for n in names}, {}
    s = _strategy(model, torch.zeros(2, 7), torch.arange(2))
    for t in range(3):
        s.experience.current_experience = t
        plugin.before_training_exp(s)
        for n in names:
            layer = getattr(model, n)
            A = torch.randn(layer.lora_A.shape, generator=gen) * 0.7 + 0.1
            B = torch.randn(layer.lora_B.shape, generator=gen)
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            As[n].append(A.reshape(A.shape[0], -1).to(DT))  # conv A (r, in, k, k): one row per rank, in·k·k long
            Bs[n] = B.to(DT)
        if t < 2:
            plugin.after_training_exp(s)
    return model, plugin, s, As, Bs


def _official_orth(As_old_new):
    """``Σ_layers torch.abs(torch.mm(lora_A, loranew_A.T)).sum()`` (src/uie_trainer_lora.py L91-97), where
    ``lora_A`` stacks every earlier task's A rows."""
    total = 0.0
    for old, new in As_old_new:
        total += float(torch.abs(torch.cat(old, 0) @ new.T).sum())
    return total


def test_olora_orthogonality_loss_is_L1_of_every_old_new_cross_gram_entry():
    """``Σ_layers Σ |A_old A_newᵀ|`` over every entry (an L1 norm, not L2, with the absolute value) summed over the
    adapted layers (a conv's A as rows of length in·k·k) and over the earlier tasks' stacked A rows
    (cmnfriend/O-LoRA src/uie_trainer_lora.py L91-97), on random matrices; its gradient w.r.t. the new A is
    ``sign(A_old A_newᵀ)ᵀ A_old`` per layer (the term trains the new A). The value logged after task 1 is the same
    sum with task 1 as the new adapter."""
    model, plugin, s, As, _ = _olora_three_tasks(0.5, 0.0)
    names = ("c", "l1", "l2")
    ref = _official_orth([(As[n][:2], As[n][2]) for n in names])
    loss = orthogonality_loss(model)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    # the wrong norms differ on these matrices: the test would see them
    l2 = sum(float(torch.linalg.matrix_norm(torch.cat(As[n][:2]) @ As[n][2].T)) for n in names)
    signed = sum(float((torch.cat(As[n][:2]) @ As[n][2].T).sum()) for n in names)
    assert abs(l2 - ref) > 1e-2 * ref and abs(signed - ref) > 1e-2 * ref
    loss.backward()
    for n in names:
        layer = getattr(model, n)
        old = torch.cat(As[n][:2])
        g_ref = torch.sign(old @ As[n][2].T).T @ old
        torch.testing.assert_close(layer.lora_A.grad.reshape(2, -1).to(DT), g_ref, atol=1e-5, rtol=1e-5)
    assert plugin.orth_history[1] == pytest.approx(_official_orth([(As[n][:1], As[n][1]) for n in names]),
                                                   rel=1e-5)
    assert plugin.orth_history[0] == 0.0  # no earlier adapter on the first task


def test_olora_loss_adds_lambda1_orth_and_lambda2_frobenius_norms_of_the_new_factors():
    """``loss + orthogonal_loss · lamda_1 + l2_loss · lamda_2`` with ``l2_loss = Σ torch.norm(loranew_*, p=2)``
    over every new A and B (src/uie_trainer_lora.py L100-109; ``torch.norm`` of a matrix with p=2 and no dim is
    its Frobenius norm, not squared), with lamda_1 0.7 and lamda_2 0.3."""
    model, plugin, s, As, Bs = _olora_three_tasks(0.7, 0.3)
    names = ("c", "l1", "l2")
    s.loss = torch.tensor(1.5)
    plugin.before_backward(s)
    orth = _official_orth([(As[n][:2], As[n][2]) for n in names])
    l2 = sum(float(torch.sqrt((As[n][2] ** 2).sum())) + float(torch.sqrt((Bs[n] ** 2).sum())) for n in names)
    assert float(s.loss.detach()) == pytest.approx(1.5 + 0.7 * orth + 0.3 * l2, rel=1e-5)
