"""coap8bit.hf: transformers.Trainer in every entry path (ordinary and in-backward), exact resume from a
mid-run checkpoint, and LLaVA's create_optimizer on a tiny LLaVA-like model. Tiny models built from configs
(hidden 64, 2 layers): nothing is downloaded. All on CPU, where every run is deterministic, so resumed runs
are compared bit for bit (losses and weights)."""
import dataclasses
import os
import sys

import pytest
import torch

# `python -m pytest` from the repo root puts the root on sys.path, where the folder kernels/ (shipped as
# coap8bit.kernels) would be found by transformers' probe for Hugging Face's top-level `kernels` package and
# refuse to import. coap8bit itself comes from the editable install and does not need the root on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_pt_utils import get_parameter_names  # noqa: E402

import coap8bit  # noqa: E402
import coap8bit.hf  # noqa: E402

torch.set_num_threads(1)

COAP = dict(rank=8, min_proj_size=1024, update_interval=2, reproject_factor=2)  # refreshes within 6 steps
STEPS, SAVE_AT, ACCUM = 6, 3, 2


def tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=STEPS * ACCUM * 2, seq=16, vocab=96, image=False):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (n, seq), generator=gen)
        self.pixels = torch.randn(n, 4, 24, generator=gen) if image else None

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "labels": self.ids[i]}
        if self.pixels is not None:
            item["pixel_values"] = self.pixels[i]
        return item


def training_args(out, in_backward, **kw):
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, save_steps=SAVE_AT, save_strategy="steps", logging_steps=1, learning_rate=3e-3,
        lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01, seed=0, report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=0.0 if in_backward else 1.0, **kw)


class Recording:
    """Mixin recording every micro-batch's loss as Trainer returns it (a Python float, unrounded)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


class RecordingTrainer(Recording, Trainer):
    losses: list


class RecordingCOAPTrainer(Recording, coap8bit.hf.COAPTrainerMixin, Trainer):
    losses: list


def build_trainer(path: str, out, model):
    """One of the four entry paths. Returns a Trainer recording its losses."""
    in_backward = path.endswith("in_backward")
    args = training_args(out, in_backward)
    data = TokenData()
    if path.startswith("optimizers"):
        opt = coap8bit.AdamW8bit(model.parameters(), lr=args.learning_rate, weight_decay=0.01, **COAP)
        sched = transformers.get_linear_schedule_with_warmup(opt, 1, STEPS)
        if in_backward:
            opt.attach(model, accumulation_steps=args.gradient_accumulation_steps)
        trainer = RecordingTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    elif path == "cls_and_kwargs":
        trainer = RecordingTrainer(model=model, args=args, train_dataset=data,
                                   optimizer_cls_and_kwargs=coap8bit.hf.get_optimizer_cls_and_kwargs(args, **COAP))
    else:
        trainer = RecordingCOAPTrainer(model=model, args=args, train_dataset=data, coap_kwargs=COAP,
                                       in_backward=in_backward)
    trainer.losses = []
    return trainer


PATHS = ["optimizers", "cls_and_kwargs", "mixin", "optimizers_in_backward", "mixin_in_backward"]


@pytest.mark.parametrize("path", PATHS)
def test_trainer_trains_and_resumes_exactly(path, tmp_path):
    in_backward = path.endswith("in_backward")
    dtype = torch.bfloat16 if in_backward else torch.float32  # in-backward is for pure-bf16 training
    full = build_trainer(path, tmp_path, tiny_llama(dtype))
    full.train()
    opt = coap8bit.hf.unwrap_optimizer(full.optimizer)
    group = opt.param_groups[0]
    kinds = [opt.param_kind(p, group) for p in full.model.parameters()]
    assert kinds.count("matrix") == 2 * 7 + 2  # q k v o gate up down per layer, embeddings, lm_head
    assert len(full.losses) == STEPS * ACCUM
    assert all(s["step"] == STEPS for s in opt.state.values())  # stepped once per update, never twice
    assert len(opt.state) == sum(1 for _ in full.model.parameters())
    assert (opt._in_backward is not None) == in_backward
    assert full.losses[-1] < full.losses[0]
    saved = torch.load(tmp_path / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)
    assert all(s["step"] == SAVE_AT for s in saved["state"].values())

    resumed = build_trainer(path, tmp_path / "resumed", tiny_llama(dtype))
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{SAVE_AT}"))
    assert resumed.losses == full.losses[SAVE_AT * ACCUM:]  # bit-identical continued losses
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_optim_args_are_parsed_and_validated():
    args = TrainingArguments(output_dir="unused", learning_rate=2e-5, adam_beta2=0.95, report_to=[],
                             optim_args="rank_ratio=2, update_interval=100,scale=0.25,rotate_moments=true,rank=none")
    cls, kwargs = coap8bit.hf.get_optimizer_cls_and_kwargs(args, power_iters=1)
    assert cls is coap8bit.AdamW8bit
    assert kwargs == dict(lr=2e-5, betas=(0.9, 0.95), eps=1e-8, rank_ratio=2.0, update_interval=100,
                          scale=0.25, rotate_moments=True, rank=None, power_iters=1)
    for bad, match in [("rank_ratio", "key=value"), ("rank_size=3", "Invalid optim_args key 'rank_size'"),
                       ("update_interval=1.5", "update_interval"), ("rotate_moments=maybe", "rotate_moments")]:
        args.optim_args = bad
        with pytest.raises(ValueError, match=match):
            coap8bit.hf.get_optimizer_cls_and_kwargs(args)
    with pytest.raises(TypeError, match="optimizer_cls"):
        coap8bit.hf.get_optimizer_cls_and_kwargs(args, optimizer_cls=torch.optim.AdamW)


# ------------------------------------------------------------------------------------------ LLaVA-like
class TinyLlava(nn.Module):
    """LLaVA's layout in miniature: frozen vision tower (stand-in for CLIP) -> 2-layer MLP ``mm_projector``
    -> image tokens prepended to the text embeddings of a LlamaForCausalLM."""

    def __init__(self):
        super().__init__()
        self.language_model = tiny_llama(torch.bfloat16)
        self.vision_tower = nn.Linear(24, 32).to(torch.bfloat16).requires_grad_(False)
        self.mm_projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64)).to(torch.bfloat16)

    def forward(self, input_ids, pixel_values, labels):
        image = self.mm_projector(self.vision_tower(pixel_values.to(torch.bfloat16)))
        text = self.language_model.get_input_embeddings()(input_ids)
        ignore = torch.full(image.shape[:2], -100, dtype=labels.dtype)
        return self.language_model(inputs_embeds=torch.cat([image, text], 1),
                                   labels=torch.cat([ignore, labels], 1))


@dataclasses.dataclass
class LlavaTrainingArguments(TrainingArguments):
    mm_projector_lr: float | None = None


class LLaVATrainer(Recording, Trainer):
    """``LLaVATrainer.create_optimizer`` from haotian-liu/LLaVA (llava/train/llava_trainer.py), its group
    construction verbatim (sagemaker / sharded-ddp branches dropped; transformers 5 has no
    ALL_LAYERNORM_LAYERS, whose content [nn.LayerNorm] is inlined), with the change documented in
    coap8bit/hf.py: the two lines marked CHANGED."""

    losses: list

    def create_optimizer(self):
        opt_model = self.model
        if self.optimizer is None:
            decay_parameters = get_parameter_names(opt_model, [nn.LayerNorm])
            decay_parameters = [name for name in decay_parameters if "bias" not in name]
            if self.args.mm_projector_lr is not None:
                projector_parameters = [name for name, _ in opt_model.named_parameters() if "mm_projector" in name]
                optimizer_grouped_parameters = [
                    {"params": [p for n, p in opt_model.named_parameters() if (n in decay_parameters and n not in projector_parameters and p.requires_grad)],
                     "weight_decay": self.args.weight_decay},
                    {"params": [p for n, p in opt_model.named_parameters() if (n not in decay_parameters and n not in projector_parameters and p.requires_grad)],
                     "weight_decay": 0.0},
                    {"params": [p for n, p in opt_model.named_parameters() if (n in decay_parameters and n in projector_parameters and p.requires_grad)],
                     "weight_decay": self.args.weight_decay, "lr": self.args.mm_projector_lr},
                    {"params": [p for n, p in opt_model.named_parameters() if (n not in decay_parameters and n in projector_parameters and p.requires_grad)],
                     "weight_decay": 0.0, "lr": self.args.mm_projector_lr},
                ]
            else:
                optimizer_grouped_parameters = [
                    {"params": [p for n, p in opt_model.named_parameters() if (n in decay_parameters and p.requires_grad)],
                     "weight_decay": self.args.weight_decay},
                    {"params": [p for n, p in opt_model.named_parameters() if (n not in decay_parameters and p.requires_grad)],
                     "weight_decay": 0.0},
                ]
            optimizer_cls, optimizer_kwargs = coap8bit.hf.get_optimizer_cls_and_kwargs(self.args)  # CHANGED
            self.optimizer = optimizer_cls(optimizer_grouped_parameters, **optimizer_kwargs)
            coap8bit.hf.attach_in_backward(self)  # CHANGED (added)
        return self.optimizer


def test_llava_create_optimizer_with_coap8bit(tmp_path):
    model = TinyLlava()
    frozen = model.vision_tower.weight.detach().clone()
    args = LlavaTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=ACCUM,
        max_steps=4, save_strategy="no", learning_rate=3e-3, weight_decay=0.01, mm_projector_lr=1e-3,
        seed=0, report_to=[], use_cpu=True, disable_tqdm=True, max_grad_norm=0.0, remove_unused_columns=False,
        optim_args="rank=8,min_proj_size=1024,update_interval=2,reproject_factor=2")
    trainer = LLaVATrainer(model=model, args=args, train_dataset=TokenData(image=True))
    trainer.losses = []
    trainer.train()
    opt = coap8bit.hf.unwrap_optimizer(trainer.optimizer)
    assert opt._in_backward is not None and opt._in_backward.accumulation_steps == ACCUM
    assert len(opt.param_groups) == 4
    assert [g["lr"] for g in opt.param_groups] == [0.0] * 4  # linear decay to 0 at max_steps, every group
    assert [g["initial_lr"] for g in opt.param_groups] == [3e-3, 3e-3, 1e-3, 1e-3]
    projector = {id(p) for p in model.mm_projector.parameters()}
    assert {id(p) for g in opt.param_groups[2:] for p in g["params"]} == projector
    kinds = [opt.param_kind(p, g) for g in opt.param_groups for p in g["params"]]
    assert kinds.count("matrix") == 2 * 7 + 2 + 2  # the language model's and both projector weights
    assert all(s["step"] == 4 for s in opt.state.values())
    assert len(opt.state) == sum(p.requires_grad for p in model.parameters())
    assert torch.equal(model.vision_tower.weight, frozen)
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
