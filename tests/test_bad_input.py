"""Careless and hostile use: every case either does the right thing (asserted bit-identical to it) or raises
a ValueError / TypeError / RuntimeError whose message names the culprit — never a silent corruption, a
half-applied step or an IndexError / KeyError / AttributeError from deep inside."""
import copy
import warnings

import numpy as np
import pytest
import torch

import coap8bit
from coap8bit.accounting import predicted_state


def _model(out=64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, out))


def _stepped(model, steps=1, **kw):
    opt = coap8bit.AdamW8bit(model.parameters(), min_proj_size=1, **kw)
    for t in range(steps):
        _backward(model, t)
        opt.step()
        opt.zero_grad()
    return opt


def _backward(model, seed=0):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))
    model(x).square().sum().backward()


def _snapshot(opt, model):
    return copy.deepcopy(([p.detach().clone() for p in model.parameters()], opt.state_dict()))


def _assert_step_refused(opt, model, match):
    """The next step raises ValueError matching ``match`` with weights and state bit-identical."""
    _backward(model, 1)
    before = _snapshot(opt, model)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_same(before, _snapshot(opt, model))


def _assert_same(a, b):
    (wa, sa), (wb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]) if torch.is_tensor(v) else v == sb["state"][i][k], k


# ---------------------------------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize("kwargs,culprit,error", [
    (dict(eps="1e-8"), "eps", TypeError),  # YAML reads 1e-8 as a string
    (dict(lr="1e-3"), "lr", TypeError),
    (dict(betas=(0.9, "0.999")), r"betas\[1\]", TypeError),
    (dict(weight_decay=True), "weight_decay", TypeError),
    (dict(lr=float("inf")), "lr", ValueError),
    (dict(lr=float("nan")), "lr", ValueError),
    (dict(weight_decay=float("inf")), "weight_decay", ValueError),
    (dict(seed=2**63), "seed", ValueError),
    (dict(seed=-1), "seed", ValueError),
    (dict(rank=2.5), "rank", TypeError),
    (dict(block_size=np.int64(48)), "block_size", ValueError),
    (dict(backend="cuda"), "backend", ValueError),
    (dict(proj_type=3), "proj_type", ValueError),
])
def test_bad_hyperparameter_is_named(kwargs, culprit, error):
    with pytest.raises(error, match=culprit):
        coap8bit.AdamW8bit(_model().parameters(), **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(lr=np.float32(1e-3)), dict(rank=np.int64(4)), dict(block_size=np.int32(64)),
    dict(betas=(np.float64(0.9), np.float32(0.999))), dict(rank_ratio=np.float64(2.0)), dict(seed=np.uint32(7)),
    dict(projection=np.True_),
])
def test_numpy_scalars_behave_as_python_numbers(kwargs):
    """Sweeps produce numpy scalars: accepted, stored as Python numbers, bit-identical results."""
    plain = {k: (tuple(float(b) for b in v) if isinstance(v, tuple) else v.item()) for k, v in kwargs.items()}
    a, b = _model(), _model()
    oa, ob = _stepped(a, 3, **kwargs), _stepped(b, 3, **plain)
    for key, value in plain.items():
        assert type(oa.param_groups[0][key]) is type(value)
    _assert_same(_snapshot(oa, a), _snapshot(ob, b))


@pytest.mark.parametrize("setting,value,culprit", [
    ("lr", float("inf"), "lr"), ("betas", (1.0, 0.999), r"betas\[0\]"), ("eps", -1.0, "eps"),
    ("weight_decay", "0.1", "weight_decay"),
])
def test_setting_broken_between_steps_is_refused_before_anything_steps(setting, value, culprit):
    model = _model()
    opt = _stepped(model)
    opt.param_groups[0][setting] = value
    _assert_step_refused(opt, model, rf"param_groups\[0\].*{culprit}")


def test_tensor_lr_from_a_scheduler_equals_float_lr():
    a, b = _model(), _model()
    oa = coap8bit.AdamW8bit(a.parameters(), lr=torch.tensor(1e-2), min_proj_size=1)
    ob = coap8bit.AdamW8bit(b.parameters(), lr=1e-2, min_proj_size=1)
    sa, sb = (torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.5 ** t) for o in (oa, ob))
    for t in range(3):
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            _backward(m, t)
            o.step()
            o.zero_grad()
            s.step()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------------------- param groups
def test_parameter_listed_twice_is_refused():
    w = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="appears twice"):
        coap8bit.AdamW8bit([w, w])


def test_non_tensor_parameter_is_named():
    with pytest.raises(TypeError, match=r"params\[1\]"):
        coap8bit.AdamW8bit([torch.nn.Parameter(torch.randn(3)), 3.0])


def test_group_failing_validation_is_not_added():
    model = _model()
    opt = coap8bit.AdamW8bit(model[0].parameters(), min_proj_size=1)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": model[1].parameters(), "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[1].parameters()})  # the same parameters, valid now
    _backward(model)
    opt.step()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


@pytest.mark.parametrize("setting,value", [("rank", 4), ("projection", False), ("optim_bits", 32),
                                           ("block_size", 64), ("proj_type", "left"), ("min_proj_size", 10**6)])
def test_state_shaping_setting_changed_after_steps_is_refused_with_nothing_stepped(setting, value):
    model = _model()
    opt = _stepped(model, rank=8)
    opt.param_groups[0][setting] = value
    _assert_step_refused(opt, model, r"shape \(64, 64\).*no longer fits")


def test_state_edited_by_hand_is_caught_at_the_next_step():
    model = _model()
    opt = _stepped(model)
    del opt.state[model[0].weight]["proj_absmax"]
    _backward(model, 1)
    with pytest.raises(ValueError, match=r"shape \(64, 64\).*expected keys"):
        opt.step()


def test_mixed_dtypes_in_one_group_each_step_as_if_alone():
    """fp32, bf16, fp16 and fp64 weights in one group: each is stepped bit-identically to the same weight in
    an optimizer of its own (seed keys stamped equal, so the random streams match)."""
    from coap8bit.distributed import SEED_KEY_ATTR

    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def make():
        ps = [torch.nn.Parameter(torch.randn(64, 48, generator=torch.Generator().manual_seed(9)).to(d)) for d in dtypes]
        for p in ps:
            setattr(p, SEED_KEY_ATTR, 0)
        return ps

    mixed, alone = make(), make()
    opts = [coap8bit.AdamW8bit(mixed, min_proj_size=1)] + [coap8bit.AdamW8bit([p], min_proj_size=1) for p in alone]
    for t in range(3):
        for p in mixed + alone:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t)).to(p.dtype)
        for o in opts:
            o.step()
    assert [p.dtype for p in mixed] == list(dtypes)
    assert all(torch.equal(a, b) and torch.isfinite(a).all() for a, b in zip(mixed, alone))


# ---------------------------------------------------------------------------------------------- layouts
def test_float64_weights_keep_their_precision():
    """lr = 0: nothing may change (fp64 weights used to round through fp32, ~1e-7)."""
    w = torch.nn.Parameter(torch.randn(100, 100, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(100, dtype=torch.float64))
    before = (w.detach().clone(), b.detach().clone())
    opt = coap8bit.AdamW8bit([w, b], lr=0.0, min_proj_size=1, min_8bit_size=1)
    for _ in range(3):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])


@pytest.mark.parametrize("make", ["channels_last", "transposed_view"])
@pytest.mark.parametrize("projection", [True, False])
def test_non_contiguous_bf16_weights_step_like_contiguous_ones(make, projection):
    shape = (64, 32, 3, 3) if make == "channels_last" else (48, 80)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    if make == "channels_last":
        strided = base.to(memory_format=torch.channels_last)
    else:
        strided = base.mT.contiguous().mT  # same values, transposed strides
    assert not strided.is_contiguous()
    a, b = torch.nn.Parameter(strided), torch.nn.Parameter(base.clone())
    oa, ob = (coap8bit.AdamW8bit([p], projection=projection, min_proj_size=1) for p in (a, b))
    for t in range(3):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(t + 1)).to(torch.bfloat16)
        a.grad, b.grad = g.clone().to(memory_format=torch.channels_last) if make == "channels_last" else g.mT.contiguous().mT, g
        oa.step()
        ob.step()
    assert torch.equal(a.detach().contiguous(), b.detach())
    assert a.stride() == strided.stride()  # the layout is the user's, kept


def test_depthwise_conv_tucker_rank_capped_by_the_unfolding():
    """(1100, 1, 3, 3): rank_ratio 4 asks r0 = 275, but the mode-0 unfolding has only 9 columns."""
    w = torch.nn.Parameter(torch.randn(1100, 1, 3, 3))
    opt = coap8bit.AdamW8bit([w])
    for t in range(3):
        w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(t))
        opt.step()
    assert opt.param_kind(w, opt.param_groups[0]) == "tucker"
    assert opt.state[w]["factor0_codes"].shape == (9, 1100) and torch.isfinite(w).all()


# ---------------------------------------------------------------------------------------------- checkpoints
def _foreign_state_dict(kind):
    model = _model()
    if kind == "torch":
        opt = torch.optim.AdamW(model.parameters())
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(model.parameters(), min_8bit_size=1)
    _backward(model)
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("kind,origin", [("torch", "torch.optim"), ("bnb", "bitsandbytes")])
def test_foreign_state_dict_is_refused_by_name_and_nothing_changes(kind, origin):
    model = _model()
    opt = _stepped(model)
    before = _snapshot(opt, model)
    with pytest.raises(ValueError, match=f"not from a coap8bit optimizer.*{origin}"):
        opt.load_state_dict(_foreign_state_dict(kind))
    _assert_same(before, _snapshot(opt, model))


def test_rejected_load_leaves_the_optimizer_as_it_was():
    """Another model's state dict (other shapes) is refused only after torch.optim replaced the groups and
    state: everything is rolled back, and training continues as if nothing happened."""
    model, twin = _model(out=32), _model(out=32)
    opt, twin_opt = _stepped(model), _stepped(twin)
    other = _stepped(_model(out=64)).state_dict()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other)
    for m, o in ((model, opt), (twin, twin_opt)):
        _backward(m, 5)
        o.step()
    _assert_same(_snapshot(opt, model), _snapshot(twin_opt, twin))


@pytest.mark.parametrize("key,value,problem", [
    ("exp_avg_absmax", float("nan"), "non-finite"), ("exp_avg_sq_absmax", float("inf"), "non-finite"),
    ("proj_absmax", -1.0, "negative"), ("numerics", float("nan"), "non-finite"),
])
def test_corrupt_values_in_a_checkpoint_are_refused(key, value, problem):
    model = _model()
    opt = _stepped(model)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0][key].view(-1)[0] = value
    before = _snapshot(opt, model)
    with pytest.raises(ValueError, match=f"{key}.*{problem}"):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt, model))


def test_resume_with_other_settings_warns_and_keeps_the_checkpoints():
    """torch.optim semantics (HF Trainer resuming with other --optim_args): the saved group settings win;
    we say which ones replaced the new optimizer's."""
    model = _model()
    sd = _stepped(model, rank=8).state_dict()
    fresh = coap8bit.AdamW8bit(model.parameters(), min_proj_size=1, rank=4)
    with pytest.warns(UserWarning, match="rank: 4 -> 8"):
        fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["rank"] == 8


def test_not_a_state_dict_is_named():
    opt = _stepped(_model())
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        opt.load_state_dict({"model": {}})


# ---------------------------------------------------------------------------------------------- in-backward
def test_attach_with_a_parameter_generator_is_a_type_error():
    model = _model()
    opt = coap8bit.AdamW8bit(model.parameters())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        opt.attach(model.parameters())


def test_parameter_unfrozen_after_attach_is_hooked_and_its_gradient_never_accumulates_forever():
    model = _model()
    model[1].weight.requires_grad_(False)
    opt = coap8bit.AdamW8bit(model.parameters(), min_proj_size=1)
    opt.attach(model)
    model[1].weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="became trainable after attach"):
        for t in range(3):
            _backward(model, t)
            opt.step()
            opt.zero_grad()
    assert model[1].weight.grad is None and opt.state[model[1].weight]["step"] == 3


def test_param_group_added_while_attached_is_stepped_in_backward():
    model = _model()
    opt = coap8bit.AdamW8bit(model[0].parameters(), min_proj_size=1)
    opt.attach()
    opt.add_param_group({"params": list(model[1].parameters())})
    for t in range(2):
        _backward(model, t)
        assert model[1].weight.grad is None  # stepped by its hook inside backward
    assert opt.state[model[1].weight]["step"] == 2


def test_attach_accepts_a_compiled_module():
    model = _model()
    compiled = torch.compile(model)  # lazy: nothing compiles until it is called
    opt = coap8bit.AdamW8bit(model.parameters(), min_proj_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "trainable parameters not in the optimizer" warning
        handle = opt.attach(compiled)
    handle.detach()


# ---------------------------------------------------------------------------------------------- accounting
def test_predicted_state_reads_a_generator_once():
    model = _model()
    opt = coap8bit.AdamW8bit(model.parameters(), min_proj_size=1)
    assert len(predicted_state(opt, params=(p for p in model.parameters())).params) == 4
