"""Every LoRA layer kind against a reference written here with plain ``F.linear`` / ``F.conv2d`` on the factors.

The layers have three ways to compute (low-rank passes while training, one pass with ``W + ΔW`` without gradients
or when cheaper, the merged base weight); each is checked against the same independent reference, with gradients
enabled and disabled, and the factor gradients against the reference's. The conv reference applies A as its own
k×k convolution (the base conv's stride, padding, dilation, groups; reflect padding by ``F.pad``) and B as a 1×1
convolution, as HF PEFT's ``Conv2d`` LoRA does; the loralib reference convolves with ``W + s·(B A).view(W.shape)``
as microsoft/LoRA's ``ConvLoRA`` does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.lora import LoRAConv2d, LoRALinear
from models.gate_lora import GateLoRAConv2d, GateLoRALinear
from models.stiefel_lora import StiefelLoRAConv2d, StiefelLoRALinear
from models.sum_lora import LoRAMagnitudes, SDLoRAConv2d, SDLoRALinear, SumLoRAConv2d, SumLoRALinear
from models.task_lora import BASE_ROUTE, TaskLoRAConv2d, TaskLoRALinear



@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in float64 (the layers follow the base weight's dtype); restored after each test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _randomise(layer):
    """Non-zero B (fresh adapters start at B = 0, which would hide the update)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def _conv_ref(x, conv: nn.Conv2d, weight, bias):
    """``conv`` computed with ``weight``: padding by hand for non-zero padding modes."""
    if conv.padding_mode != "zeros":
        ph, pw = conv.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=conv.padding_mode)
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def ref_linear(x, base: nn.Linear, A, B, s):
    return x @ base.weight.T + (0 if base.bias is None else base.bias) + s * (x @ A.T) @ B.T


def ref_conv_kxk_1x1(x, base: nn.Conv2d, A, B, s):
    """base(x) + s · conv1x1_B(conv_A(x)): A a k×k conv in→r (grouped like the base), B a 1×1 conv r→out."""
    h = _conv_ref(x, base, A, None)
    return _conv_ref(x, base, base.weight, base.bias) + s * F.conv2d(h, B, groups=base.groups)


def ref_conv_loralib(x, base: nn.Conv2d, A, B, s):
    return _conv_ref(x, base, base.weight + s * (B @ A).view(base.weight.shape), base.bias)


# every conv kind, narrow (out 8 with r 2: trains through conv(x, W + ΔW), as loralib always does) and wide (out 24:
# the fused low-rank function, models.lora.lora_conv2d); depthwise needs r = groups, so it is always narrow
CONVS = {
    "3x3": lambda o: nn.Conv2d(6, o, 3, padding=1),
    "3x3_no_bias": lambda o: nn.Conv2d(6, o, 3, padding=1, bias=False),
    "1x1": lambda o: nn.Conv2d(6, o, 1),
    "stride2_dilation2": lambda o: nn.Conv2d(6, o, 3, stride=2, padding=2, dilation=2),
    "reflect": lambda o: nn.Conv2d(6, o, 3, padding=1, padding_mode="reflect"),
    "circular": lambda o: nn.Conv2d(6, o, 3, padding=1, padding_mode="circular"),
    "grouped": lambda o: nn.Conv2d(6, o, 3, padding=1, groups=2),
    "depthwise": lambda o: nn.Conv2d(o, o, 3, padding=1, groups=o),
    "rect_kernel_stride": lambda o: nn.Conv2d(4, o, (3, 5), stride=(1, 2), padding=(1, 2)),
    "same_padding": lambda o: nn.Conv2d(6, o, 3, padding="same", dilation=2),
}


def _cases():
    for name in CONVS:
        for width in (8, 24):
            if name == "depthwise" and width == 24:
                continue
            yield name, width, "kxk_1x1"
            if name not in ("grouped", "depthwise", "rect_kernel_stride"):
                yield name, width, "loralib"


def _check_all_paths(layer, ref, x):
    """Output with gradients (training), without, and merged, against ``ref(x, A, B)``; factor gradients and the
    input gradient (what adapters in earlier layers train on) too."""
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = ref(x_ref, A, B)
    layer.train()
    x_in = x.detach().clone().requires_grad_(True)
    out = layer(x_in)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x_in.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    assert all(p.grad is None for p in layer.base_layer.parameters()), "the base layer must stay frozen"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-10, atol=1e-10)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-10, atol=1e-10)
    layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-10, atol=1e-10)
    layer.unmerge()
    return expected


@pytest.mark.parametrize("bias", [True, False])
def test_linear_against_matmul_of_factors(bias):
    torch.manual_seed(0)
    layer = _randomise(LoRALinear(nn.Linear(7, 5, bias=bias), r=3, alpha=6.0))
    x = torch.randn(4, 2, 7)  # extra leading dims, as a ViT's tokens
    _check_all_paths(layer, lambda x, A, B: ref_linear(x, layer.base_layer, A, B, 2.0), x)


def test_fused_linear_function_gradcheck():
    """The fused training pass (``models.lora.lora_linear``: one GEMM with ``W + s·B A`` forward, one for the input
    gradient backward) against finite differences, for every input that can require a gradient: the input, a
    trainable base weight and bias, both factors and a learnt scale (SD-LoRA's magnitudes)."""
    from models.lora import lora_linear

    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, requires_grad=True)
    W, b = torch.randn(4, 5, requires_grad=True), torch.randn(4, requires_grad=True)
    A, B = torch.randn(2, 5, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    s = torch.tensor(0.7, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t), (x, W, b, A, B, s))
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear(x, W.detach(), None, A, B, 1.5), (x, A, B))
    # no second derivative: asking for one is an error, not a silently missing term
    (gx,) = torch.autograd.grad(lora_linear(x, W, b, A, B, s).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|not have a grad_fn"):
        gx.sum().backward()


@pytest.mark.parametrize("name", ["3x3", "grouped", "stride2_dilation2", "reflect"])
def test_fused_conv_function_gradcheck(name):
    """The fused k×k / 1×1 training pass (``models.lora.lora_conv2d``) against finite differences: input, trainable
    base weight and bias, both factors, a learnt scale; grouped, strided and dilated, reflect-padded convs."""
    from models.lora import lora_conv2d

    torch.manual_seed(0)
    conv = CONVS[name](4)
    r = 2
    A = torch.randn(r, conv.weight.shape[1], *conv.kernel_size, requires_grad=True)
    B = torch.randn(4, r // conv.groups, 1, 1, requires_grad=True)
    s = torch.tensor(0.7, requires_grad=True)
    x = torch.randn(2, conv.in_channels, 6, 7, requires_grad=True)

    assert torch.autograd.gradcheck(lambda x, A, B, s: lora_conv2d(x, conv, A, B, s), (x, A, B, s))
    # the base weight and bias as trainable inputs too (the library freezes them; the function must not assume it)
    w0, b0 = conv.weight.detach().clone().requires_grad_(True), conv.bias.detach().clone().requires_grad_(True)
    from models.lora import _LoRAConvFunction

    pad = conv.padding if conv.padding_mode == "zeros" else (0, 0)
    xp = x if conv.padding_mode == "zeros" else F.pad(x.detach(), conv._reversed_padding_repeated_twice,
                                                      mode=conv.padding_mode).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, A, B: _LoRAConvFunction.apply(x, w, b, A, B, conv.stride, pad, conv.dilation, conv.groups),
        (xp, w0, b0, A, B))


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_scale_is_alpha_over_r_or_sqrt_r(rslora):
    torch.manual_seed(0)
    layer = _randomise(LoRALinear(nn.Linear(7, 5), r=4, alpha=3.0, rslora=rslora))
    s = 3.0 / (2.0 if rslora else 4.0)
    _check_all_paths(layer, lambda x, A, B: ref_linear(x, layer.base_layer, A, B, s), torch.randn(3, 7))


@pytest.mark.parametrize("name,width,mode", list(_cases()))
def test_conv_against_plain_convolutions(name, width, mode):
    torch.manual_seed(0)
    base = CONVS[name](width)
    r = base.groups if name == "depthwise" else 2
    layer = _randomise(LoRAConv2d(base, r=r, alpha=3.0 * r, conv_mode=mode))
    with torch.enable_grad():  # which training pass this case exercises: the fused function, or W + ΔW
        assert layer._through_weight() == (mode == "loralib" or width == 8)
    x = torch.randn(2, base.in_channels, 9, 10)
    ref = ref_conv_loralib if mode == "loralib" else ref_conv_kxk_1x1
    _check_all_paths(layer, lambda x, A, B: ref(x, base, A, B, 3.0), x)


@pytest.mark.parametrize("width", [16, 80])
def test_grouped_conv_with_several_ranks_per_group(width):
    """groups = 4 with r = 8: two ranks per group, so A's rows must be read group-major (with one rank per group
    every layout gives the same update). Out 16 trains through W + ΔW, out 80 through the fused function."""
    torch.manual_seed(0)
    base = nn.Conv2d(8, width, 3, padding=1, groups=4)
    layer = _randomise(LoRAConv2d(base, r=8, alpha=4.0))
    with torch.enable_grad():
        assert layer._through_weight() == (width == 16)
    _check_all_paths(layer, lambda x, A, B: ref_conv_kxk_1x1(x, base, A, B, 0.5), torch.randn(2, 8, 7, 6))


def test_dropout_reaches_only_the_adapter_input():
    """With dropout p the update sees dropout(x) (one mask), the base path sees x: reproduced with the same mask."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = _randomise(LoRALinear(base, r=2, dropout=0.5))
    layer.train()
    x = torch.randn(5, 6)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, base(x) + (dropped @ layer.lora_A.T) @ layer.lora_B.T)
    assert not torch.allclose(out, ref_linear(x, base, layer.lora_A, layer.lora_B, 1.0))
    layer.eval()  # no dropout in evaluation
    torch.testing.assert_close(layer(x), ref_linear(x, base, layer.lora_A, layer.lora_B, 1.0))


def _bank(layer, n_tasks, magnitudes=None):
    """Stores ``n_tasks`` random adapters in the layer's bank and starts a current one; returns the factors."""
    g = torch.Generator().manual_seed(5)
    stored = []
    for t in range(n_tasks):
        layer.current_task = t
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        stored.append((layer.lora_A.detach().clone(), layer.lora_B.detach().clone()))
        layer.store_adapter(t)
        if magnitudes is not None:
            magnitudes.freeze_current(t)
    layer.current_task = n_tasks
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return stored


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_grouped", "conv_wide", "conv_grouped_wide"])
def test_summed_branches_against_the_sum_of_plain_passes(kind):
    """InfLoRA / O-LoRA: out = base(x) + s Σ_t B_t A_t x + s B A x; r and out chosen so that the training pass is the
    stacked low-rank pass for the wide conv and the linear, the W + ΔW pass for the others."""
    torch.manual_seed(0)
    if kind == "linear":
        base, r = nn.Linear(40, 48), 2
        layer, ref, x = SumLoRALinear(base, r=r, alpha=3.0), ref_linear, torch.randn(3, 40)
    else:
        base = {"conv": nn.Conv2d(6, 8, 3, padding=1), "conv_grouped": nn.Conv2d(6, 8, 3, padding=1, groups=2),
                "conv_wide": nn.Conv2d(6, 48, 3, padding=1),
                "conv_grouped_wide": nn.Conv2d(6, 48, 3, padding=1, groups=2)}[kind]
        r = 4 if "grouped" in kind else 2  # two ranks per group, so the stacking order within a group matters
        layer, ref, x = SumLoRAConv2d(base, r=r, alpha=3.0), ref_conv_kxk_1x1, torch.randn(2, 6, 7, 7)
    stored = _bank(layer, 3)
    s = 3.0 / r

    def reference(x, A, B):
        out = ref(x, base, A, B, s)
        for a, b in stored:
            out = out + ref(x, base, a, b, s) - ref(x, base, torch.zeros_like(a), b, s)  # adds s·B_t A_t x only
        return out

    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    expected = reference(x, A, B)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)
    assert all(p.grad is None for p in list(layer.bank_A.values()) + list(layer.bank_B.values()))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-10, atol=1e-10)
    layer.current_task = None  # the current adapter left out: only the bank
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x, torch.zeros_like(A), B).detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv_wide"])
def test_sd_lora_directions_and_magnitudes_against_the_formula(kind):
    """SD-LoRA: out = base(x) + Σ_t α_t B̂_t Â_t x + α · s · B A x, B̂ = B/‖B‖_F, Â = A/‖A‖_F (unit directions), with
    scale s = alpha/r != 1 and magnitudes != 1; gradients reach the magnitudes and the current factors only."""
    torch.manual_seed(0)
    mags = LoRAMagnitudes(init=0.8)
    if kind == "linear":
        base = nn.Linear(40, 48)
        layer, ref, x = SDLoRALinear(base, r=2, alpha=6.0), ref_linear, torch.randn(3, 40)
    else:
        base = nn.Conv2d(6, 48, 3, padding=1)
        layer, ref, x = SDLoRAConv2d(base, r=2, alpha=6.0), ref_conv_kxk_1x1, torch.randn(2, 6, 7, 7)
    object.__setattr__(layer, "magnitudes", mags)
    stored = _bank(layer, 2, magnitudes=mags)
    with torch.no_grad():
        mags.past["0"].fill_(1.7)
        mags.past["1"].fill_(-0.4)
        mags.current.fill_(1.3)
    s = 3.0
    out = layer(x)
    expected = ref(x, base, layer.lora_A, layer.lora_B, 1.3 * s)
    for t, (a, b) in enumerate(stored):
        alpha_t = (1.7, -0.4)[t]
        expected = expected + ref(x, base, a / a.norm(), b / b.norm(), alpha_t) - ref(x, base, 0 * a, b, 0.0)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    assert mags.current.grad is not None and all(p.grad is not None for p in mags.past.values())
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert all(p.grad is None for p in list(layer.bank_A.values()) + list(layer.bank_B.values()))
    # the stored directions are unit-norm and carry no scale
    for k in layer.bank_A:
        torch.testing.assert_close(layer.bank_A[k].norm(), torch.tensor(1.0))
        torch.testing.assert_close(layer.bank_B[k].norm(), torch.tensor(1.0))


@pytest.mark.parametrize("kind", ["linear", "conv_reflect", "conv_wide_reflect", "conv_grouped_wide"])
def test_per_task_routing_against_each_tasks_plain_pass(kind):
    """Per-task LoRA: each sample goes through its own task's adapter (bank or current), or the bare base layer
    (BASE_ROUTE); a mixed batch equals the per-sample references, with and without gradients."""
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(6, 40)
        layer, ref, x = TaskLoRALinear(base, r=2, alpha=5.0), ref_linear, torch.randn(6, 6)
    else:
        base = {"conv_reflect": nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
                "conv_wide_reflect": nn.Conv2d(6, 24, 3, padding=1, padding_mode="reflect"),
                "conv_grouped_wide": nn.Conv2d(6, 24, 3, padding=1, groups=2)}[kind]
        layer, ref, x = TaskLoRAConv2d(base, r=2, alpha=5.0), ref_conv_kxk_1x1, torch.randn(6, 6, 7, 7)
    stored = _bank(layer, 2)
    current = (layer.lora_A, layer.lora_B)
    labels = torch.tensor([0, 2, 1, BASE_ROUTE, 2, 0])
    factors = {0: stored[0], 1: stored[1], 2: current}
    expected = torch.cat([
        base(x[i:i + 1]) if t == BASE_ROUTE else ref(x[i:i + 1], base, *factors[int(t)], 2.5)
        for i, t in enumerate(labels)])
    layer.task_labels = labels
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.sum().backward()  # only the current task's samples reach the current factors
    A, B = current[0].detach().clone().requires_grad_(True), current[1].detach().clone().requires_grad_(True)
    sel = labels == 2
    ref(x[sel], base, A, B, 2.5).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-10, atol=1e-10)
        layer.task_labels = 1  # a whole batch of one task
        torch.testing.assert_close(layer(x), ref(x, base, *stored[1], 2.5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_wide"])
def test_gate_lora_against_B_diag_w_A(kind):
    """CoDyRA: ΔW = s · B diag(w) A; a zero gate removes its rank; gradients reach A, B and w."""
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(6, 40)
        layer, ref, x = GateLoRALinear(base, r=3, alpha=6.0), ref_linear, torch.randn(4, 6)
    else:
        base = nn.Conv2d(6, 8 if kind == "conv" else 48, 3, padding=1)
        layer, ref, x = GateLoRAConv2d(base, r=3, alpha=6.0), ref_conv_kxk_1x1, torch.randn(2, 6, 7, 7)
    _randomise(layer)
    with torch.no_grad():
        layer.lora_gate.copy_(torch.tensor([0.7, 0.0, -1.3]))
    w = layer.lora_gate.detach().clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    gated = A * w.view(-1, *([1] * (A.ndim - 1)))
    expected = ref(x, base, gated, B, 2.0)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    for p, q in ((layer.lora_gate, w), (layer.lora_A, A), (layer.lora_B, B)):
        torch.testing.assert_close(p.grad, q.grad)
    assert torch.all(layer.lora_A.grad[1] == 0), "a zero gate must cut its rank's gradient"
    layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_stiefel_lora_against_s_U_V_transpose(kind):
    """EBLoRA: ΔW = (alpha/r) · s · U Vᵀ (U = lora_B, Vᵀ = lora_A reshaped like the unfolded weight)."""
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(10, 12)
        layer, x = StiefelLoRALinear(base, r=3, alpha=6.0), torch.randn(4, 10)
    else:
        base = nn.Conv2d(4, 12, 3, padding=1)
        layer, x = StiefelLoRAConv2d(base, r=3, alpha=6.0), torch.randn(2, 4, 6, 6)
    U = torch.linalg.qr(torch.randn(12, 3))[0]
    V = torch.linalg.qr(torch.randn(layer.fan_in, 3))[0]
    layer.set_factors(U, V)
    with torch.no_grad():
        layer.lora_scale.fill_(0.37)
    delta = 2.0 * 0.37 * (U @ V.T)
    if kind == "linear":
        expected = F.linear(x, base.weight + delta, base.bias)
    else:
        expected = F.conv2d(x, base.weight + delta.view(base.weight.shape), base.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
