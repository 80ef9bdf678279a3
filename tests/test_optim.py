"""FlatAdamW: torch's AdamW over one flat tensor per group, the model's parameters views of it."""

import copy

import pytest
import torch
from torch import nn

from mpq_lightning.optim import ALIGN, FlatAdamW


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.5))  # 0-d, as a quantizer step
        self.table = nn.Parameter(torch.rand(4, 3) + 0.5)  # an activation-step table
        self.unused = nn.Parameter(torch.ones(6))

    def forward(self, x, use_unused: bool = False):
        y = self.b(torch.tanh(self.a(x))) * self.scale * self.table.mean(0)
        return y + self.unused.sum() if use_unused else y


def _groups(net):
    return [{"params": [net.a.weight, net.a.bias, net.scale], "lr": 1e-2, "name": "g0"},
            {"params": [net.b.weight, net.table, net.unused], "lr": 3e-3, "name": "g1"}]


def _train(net, opt, steps, seed=0, use_unused=True):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=g)
        opt.zero_grad(set_to_none=True)
        net(x, use_unused).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": True}])
def test_flat_steps_like_adamw_over_each_tensor(impl):
    torch.manual_seed(0)
    ref = _Net()
    net = copy.deepcopy(ref)
    _train(ref, torch.optim.AdamW(_groups(ref), weight_decay=0.01, **impl), 6)
    opt = FlatAdamW(_groups(net), weight_decay=0.01, **impl)
    versions = [p._version for p in net.parameters()]
    _train(net, opt, 6)
    # each member's in-place write counter moved, as AdamW's own writes move it (caches key on it)
    assert all(p._version > v for p, v in zip(net.parameters(), versions))
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    # the members are views of their group's flat tensor, each on a 16-element boundary
    for i, group in enumerate(opt.param_groups):
        flat = group["params"][0]
        assert len(group["params"]) == 1 and flat.grad is not None
        for p in opt.members(i):
            assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            assert p.storage_offset() % ALIGN == 0 and p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in ref.named_parameters()]  # the module keeps its own


def test_zero_grad_is_in_place_and_replaced_gradients_are_taken_over():
    """``zero_grad(set_to_none=True)`` zeroes the flat gradient (the members' grads stay views of it);
    gradients set to None elsewhere (``module.zero_grad()``) and re-created by backward still step."""
    torch.manual_seed(1)
    ref = _Net()
    net = copy.deepcopy(ref)
    ref_opt = torch.optim.AdamW(_groups(ref), weight_decay=0.0)
    opt = FlatAdamW(_groups(net), weight_decay=0.0)
    x = torch.randn(8, 5)
    for model, o in ((ref, ref_opt), (net, opt)):
        model(x, True).pow(2).mean().backward()
        o.step()
        o.zero_grad()
    view = net.a.weight.grad
    assert view is not None and not view.any()
    for model, o in ((ref, ref_opt), (net, opt)):
        model.zero_grad(set_to_none=True)  # the module's own zero_grad: every .grad None
        model(x, True).pow(2).mean().backward()
        o.step()
    assert net.a.weight.grad is view  # a view again
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_member_without_gradient_steps_as_with_zero_gradient():
    """The designed difference from torch's AdamW: a member that got no gradient is stepped with a zero
    gradient (weight decay applies, moments decay) where AdamW over each tensor skips it."""
    torch.manual_seed(2)
    net = _Net()
    ref = copy.deepcopy(net)
    opt = FlatAdamW(_groups(net), weight_decay=0.1)
    _train(net, opt, 2, use_unused=False)
    ref_opt = torch.optim.AdamW(_groups(ref), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(8, 5, generator=g)
        ref_opt.zero_grad(set_to_none=False)  # explicit zeros: AdamW steps every tensor
        for p in ref.parameters():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        ref(x, False).pow(2).mean().backward()
        ref_opt.step()
    torch.testing.assert_close(net.unused, ref.unused)
    assert (net.unused < 1).all()  # decayed: 1 * (1 - lr * wd) per step


def test_rebound_member_is_repacked_before_the_first_step_and_refused_after():
    torch.manual_seed(3)
    net = _Net()
    opt = FlatAdamW(_groups(net), weight_decay=0.0)
    with torch.no_grad():  # a quantizer initialised with another shape: its data is rebound
        net.table.data = torch.full((5, 3), 2.0)
    opt.relink()
    flat = opt.param_groups[1]["params"][0]
    assert net.table.shape == (5, 3) and net.table.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert torch.equal(net.table, torch.full((5, 3), 2.0))
    _train(net, opt, 1)
    assert not torch.equal(net.table, torch.full((5, 3), 2.0))  # it trains
    net.b.weight.data = net.b.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"group 'g1': its tensor #0 \(shape \(3, 7\)\) was re-bound"):
        _train(net, opt, 1)


def test_state_dict_has_the_members_layout_and_resumes_either_way():
    """The state dict is torch's AdamW's over the same groups: a run continues alike from a FlatAdamW
    state loaded into AdamW and from an AdamW state loaded into FlatAdamW."""
    torch.manual_seed(4)
    start = _Net()
    flat_net, ref_net = copy.deepcopy(start), copy.deepcopy(start)
    flat_opt = FlatAdamW(_groups(flat_net), weight_decay=0.01)
    ref_opt = torch.optim.AdamW(_groups(ref_net), weight_decay=0.01, fused=True)
    _train(flat_net, flat_opt, 3)
    _train(ref_net, ref_opt, 3)
    sd_flat, sd_ref = flat_opt.state_dict(), ref_opt.state_dict()
    assert [g["params"] for g in sd_flat["param_groups"]] == [g["params"] for g in sd_ref["param_groups"]]
    assert sd_flat["state"].keys() == sd_ref["state"].keys()
    for k, st in sd_ref["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sd_flat["state"][k][key], st[key], rtol=1e-6, atol=1e-8)
    # cross-load and continue: FlatAdamW state -> AdamW, AdamW state -> FlatAdamW
    a, b = copy.deepcopy(flat_net), copy.deepcopy(ref_net)
    opt_a = torch.optim.AdamW(_groups(a), weight_decay=0.01, fused=True)
    opt_a.load_state_dict(sd_flat)
    opt_b = FlatAdamW(_groups(b), weight_decay=0.01)
    opt_b.load_state_dict(sd_ref)
    _train(a, opt_a, 3, seed=1)
    _train(b, opt_b, 3, seed=1)
    _train(flat_net, flat_opt, 3, seed=1)
    for p, q, r in zip(a.parameters(), b.parameters(), flat_net.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(q, r, rtol=1e-6, atol=1e-7)
    bad = copy.deepcopy(sd_ref)
    bad["state"][1]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state 'exp_avg' of group 'g0' tensor #1 has shape \(3,\), the parameter \(7,\)"):
        FlatAdamW(_groups(copy.deepcopy(start)), weight_decay=0.01).load_state_dict(bad)
    with pytest.raises(ValueError, match=r"groups of \[2, 3\] tensors, this optimiser \[3, 3\]"):
        bad = copy.deepcopy(sd_ref)
        bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:2]
        FlatAdamW(_groups(copy.deepcopy(start)), weight_decay=0.01).load_state_dict(bad)


def test_grad_clipping_and_scaler_see_the_members_gradients():
    """Lightning clips and unscales over the optimiser's parameters: the flat gradient is the members'."""
    torch.manual_seed(5)
    net = _Net()
    opt = FlatAdamW(_groups(net), weight_decay=0.0)
    net(torch.randn(8, 5), True).pow(2).mean().backward()
    members = [p for i in range(2) for p in opt.members(i)]
    expected = torch.nn.utils.get_total_norm([p.grad for p in members])
    flat_params = [g["params"][0] for g in opt.param_groups]
    total = torch.nn.utils.clip_grad_norm_(flat_params, max_norm=1e-3)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(torch.nn.utils.get_total_norm([p.grad for p in members]), torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_bad_groups_are_refused_by_name():
    net = _Net()
    with pytest.raises(ValueError, match="group 'g1' holds a tensor of another group"):
        FlatAdamW([{"params": [net.a.weight], "name": "g0"}, {"params": [net.a.weight], "name": "g1"}])
    with pytest.raises(ValueError, match="group 'h' mixes dtypes"):
        FlatAdamW([{"params": [net.a.weight, nn.Parameter(torch.zeros(2, dtype=torch.float64))], "name": "h"}])


def test_module_picks_flat_groups_unless_the_strategy_owns_the_storage():
    """``model.optim.flat_params``: null = flat on a CPU except under strategies that keep the
    parameters' storage (FSDP, DeepSpeed); true there is refused naming the key; false = AdamW over
    each tensor."""
    from types import SimpleNamespace

    from mpq_lightning.module import OptimConfig, QATModule

    def strategy(name, device="cpu"):
        return SimpleNamespace(strategy=type(name, (), {"root_device": torch.device(device)})())

    def flat(value, trainer, device="cpu"):
        module = SimpleNamespace(optim_cfg=OptimConfig(flat_params=value), device=torch.device(device))
        return QATModule.use_flat_params(module, trainer)

    assert flat(None, None) and flat(None, strategy("SingleDeviceStrategy")) and flat(None, strategy("DDPStrategy"))
    assert not flat(None, strategy("FSDPStrategy")) and not flat(None, strategy("DeepSpeedStrategy"))
    assert not flat(False, strategy("DDPStrategy"))
    # on a GPU only when asked for (not measured there yet)
    assert not flat(None, strategy("SingleDeviceStrategy", "cuda")) and not flat(None, None, "cuda")
    assert flat(True, strategy("DDPStrategy", "cuda"))
    with pytest.raises(ValueError, match="model.optim.flat_params=true with DeepSpeedStrategy"):
        flat(True, strategy("DeepSpeedStrategy"))


def test_grad_scaler_steps_like_adamw():
    """``16-mixed``'s grad scaler unscales the optimiser's (flat) gradients and hands the fused step its
    scale and inf flag: the result is AdamW's over each tensor, and an inf gradient skips the step."""
    torch.manual_seed(6)
    ref = _Net()
    net = copy.deepcopy(ref)
    results = []
    for model, opt in ((ref, torch.optim.AdamW(_groups(ref), fused=True)), (net, FlatAdamW(_groups(net), fused=True))):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        g = torch.Generator().manual_seed(0)
        for i in range(3):
            opt.zero_grad()
            loss = model(torch.randn(8, 5, generator=g), True).pow(2).mean()
            scaler.scale(loss * (float("inf") if i == 1 else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
        results.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale()))
    (ref_params, ref_scale), (params, scale) = results
    assert scale == ref_scale == 2.0**7  # one skipped step halved it
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
