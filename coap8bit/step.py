"""The COAP step of one parameter as plain functions: schedule, project, refresh, moment update, apply.

``COAPAdamW.step()``, the in-backward accumulation (``inbackward``) and the quantization-error tracker
(``accounting.QuantErrorTracker``, a :class:`StepObserver`) all go through these functions; the Optimizer
class only validates, owns the state and builds one :class:`ParamStep` per parameter and step.

A matrix step (t = the parameter's step number, 1-based)::

    lowrank = project_gradient(ctx, grad, t, refresh=True)   # S = G Pᵀ, with P refreshed first if due
    apply_lowrank(ctx, lowrank, t)                           # commit P, Adam on S, W <- W - lr·N P

Every step is all or nothing: anything that would make it non-finite raises :class:`SkipStep` (or QR/SVD
raises ``LinAlgError``) before the first write, and the caller counts the skip.

A large matrix (a·r above ``projection.STEP_BLOCK_ELEMS``, held whole: not an FSDP2 shard, no observer) takes
the same step by blocks of canonical rows instead, :func:`step_matrix_blocked`: no a×r or a×b temporary, the
refreshes from sums over the blocks (``projection.GramSketch``, ``projection.BlockedProjectorStep``), the
all-or-nothing decision from a first pass that computes max |S|; docs/design.md ("the row-blocked step").

Numerics (every kind): the normalized update N = m̂/(√v̂+eps) is clamped to exact Adam's bound for the
group's betas at that step (``bound.adam_update_bound``; a no-op for exact moments, it removes quantization
artefacts), and counted in ``state["numerics"]``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import distributed as dist_
from . import functional as Fn
from . import projection as proj
from .bound import adam_update_bound
from .dispatch import Backend
from .format import HEADER_DECAY, HEADER_OK
from .layout import MOMENT_RANK_DIM, Kind, matrix_layout, moment_block, tucker_ranks
from .qstate import StateTensor, moments, projector

__all__ = ["SkipStep", "check_grad", "refresh_event", "ParamStep", "StepObserver", "PendingProjector",
           "LowRankGradient", "Verdict", "decide_step", "take_step", "project_gradient", "apply_lowrank",
           "rotate_moments", "blocked_rows", "step_matrix_blocked"]

# Purposes mixed into derive_seed so that streams of different uses never coincide.
SEED_INIT, SEED_PROJ_SR, SEED_PARAM_SR = 1, 2, 3

# Ablation switch (benchmarks/seed_robustness.py --ablation): unprojected 8-bit tensors through bitsandbytes'
# fused kernel, as 0.1.0 did, instead of our bounded update. Off: that kernel's N is unbounded and its v map
# has the zero point; measured equal or worse loss (RESULTS.md, ablation section).
_DENSE8_BNB_FUSED = False


class SkipStep(Exception):
    """Raised inside one parameter's step, before any state is written, when it must be skipped."""


def _require(ok: bool) -> None:
    if not ok:
        raise SkipStep


def check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError("coap8bit does not support sparse gradients (e.g. nn.Embedding(sparse=True))")
    if grad.shape != p.shape:
        raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter {tuple(p.shape)}")


def refresh_event(step: int, group: dict) -> str | None:
    """The projector schedule (t = step, 1-based): "init" at t == 1 (range finder on a seeded Gaussian
    sketch); "reproject" when (t-1) % (T_u·factor) == 0 (warm-started range finder, sketch G P_oldᵀ);
    "sgd" when (t-1) % T_u == 0 (correlation-aware SGD step); else None."""
    if step == 1:
        return "init"
    T_u = group["update_interval"]
    if (step - 1) % (T_u * group["reproject_factor"]) == 0:
        return "reproject"
    return "sgd" if (step - 1) % T_u == 0 else None


class StepObserver:
    """Hooks at the step's two requantization points (the moment update, a projector commit), in the
    manner of torch's optimizer hooks: what the quantization-error tracker measures. No-ops here."""

    def moments_before(self, ctx: ParamStep, step: int):
        """Called before the moments are updated; the value returned is passed to :meth:`moments_after`
        (None: nothing to measure at this step)."""
        return None

    def moments_after(self, ctx: ParamStep, token, g: torch.Tensor, step: int) -> None:
        pass

    def projector_committed(self, ctx: ParamStep, pending: PendingProjector, P_old: torch.Tensor | None,
                            step: int) -> None:
        """After a refreshed projector was written (``P_old``: the one it replaced; None at the first)."""


@dataclasses.dataclass
class ParamStep:
    """What one parameter's step reads: the parameter, its group and state, its kind, the backend bound to
    its device, its FSDP2 shard (None for a plain tensor) and the observer (None: no tracking)."""

    p: torch.Tensor
    group: dict
    state: dict
    kind: Kind
    backend: Backend
    shard: dist_.ParamShard | None = None
    observer: StepObserver | None = None
    # Skips decided on the device and not yet counted on the host (0-dim int32 on the parameter's device; the
    # optimizer folds them into state["step"] / ["skipped"] at refresh steps and whenever state is read).
    pending: torch.Tensor | None = None
    _loaded: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def block_size(self) -> int:
        return moment_block(self.kind, self.group)

    def moments(self) -> tuple[StateTensor, StateTensor]:
        return moments(self.state, self.block_size, self.backend)

    def projector(self, name: str) -> StateTensor:
        return projector(self.state, name, self.block_size, self.backend)

    def load_projector(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The projector in ``dtype``, dequantized once per step and dtype (fp32: the fp32 state's own tensor
        under fp32; a bf16 gradient's GEMMs take it dequantized straight to bf16, one pass)."""
        key = (name, dtype)
        if key not in self._loaded:
            view, fp32 = self.projector(name), self._loaded.get((name, torch.float32))
            if fp32 is not None or not view.quantized or dtype == torch.float32:
                self._loaded[key] = (view.load() if fp32 is None else fp32).to(dtype)
            else:
                self._loaded[key] = self.backend.dequantize(view.codes, view.absmax, signed=True,
                                                            block_size=self.block_size, dtype=dtype)
        return self._loaded[key]

    def defers_skip(self, step: int) -> bool:
        """Whether step ``step`` decides a skip on the device, without a host sync: the fused path, 8-bit
        state, a parameter held whole (shards must agree on the host), and not a refresh step (refreshes
        sync anyway; the optimizer settles pending skips before them, so their schedule stays exact)."""
        return (self.backend.fused and self.pending is not None and self.shard is None and self.state["step"] > 0
                and refresh_event(step, self.group) is None)

    @functools.cached_property
    def layout(self) -> proj.ProjLayout:
        return matrix_layout(self.p, self.group)

    @functools.cached_property
    def ops(self) -> dist_.LocalMatrix:
        return dist_.matrix_ops(self.shard, self.layout.transposed)

    def seed(self, step: int, purpose: int) -> int:
        return proj.derive_seed(self.group["seed"], self.state["seed_key"], step, purpose)

    def param_sr_seed(self, step: int) -> int | None:
        if self.p.dtype == torch.bfloat16 and self.group["bf16_stochastic_rounding"]:
            return self.seed(step, SEED_PARAM_SR)
        return None


@dataclasses.dataclass
class PendingProjector:
    """A refreshed projector computed but not yet written: ``P`` is the fp32 value every product of this
    step uses (the dequantized codes under 8-bit), ``target`` what the refresh computed before rounding."""

    name: str
    target: torch.Tensor
    P: torch.Tensor
    codes: torch.Tensor | None = None
    absmax: torch.Tensor | None = None


@dataclasses.dataclass
class LowRankGradient:
    """S = G Pᵀ (fp32, a×r), the P that produced it and, at a refresh, the pending new projector."""

    S: torch.Tensor
    P: torch.Tensor
    pending: PendingProjector | None = None


# ---------------------------------------------------------------------------------------------- moments
def moments_fit(ctx: ParamStep, g: torch.Tensor | None, step: int, ops=None, *,
                peak: torch.Tensor | None = None) -> None:
    """Raise SkipStep unless an Adam update with ``g`` keeps the moments finite (which also requires g
    finite): checked before anything is written, so a skipped step leaves state bit-identical. One host
    sync; on FSDP2 shards the verdict is all-reduced so that every rank skips alike. ``peak``: max |g|
    already known (the blocked step's), instead of ``g``."""
    beta1, beta2 = ctx.group["betas"]
    m, v = ctx.moments()
    g_peak = (_peak(g, ctx.backend) if peak is None else peak).to(torch.float32)
    # The three peaks in one host read, the verdict in emulated fp32 (functional.moments_stay_finite's result).
    peaks = torch.stack([g_peak, m.peak(), v.peak()]).tolist()
    fits = Fn.moments_stay_finite_host(*peaks, beta1=beta1, beta2=beta2, step=step)
    _require(fits if ops is None else ops.all_true(fits, g_peak.device))


@dataclasses.dataclass
class Verdict:
    """What :func:`decide_step` found: the 8-bit step's header (format.HEADER_*; None when the host decided) and
    the weight-decay factor to apply (a float, or the header's device slot when the skip is deferred)."""

    header: torch.Tensor | None
    decay: float | torch.Tensor


def decide_step(ctx: ParamStep, g: torch.Tensor | None, step: int, ops=None, *,
                peak: torch.Tensor | None = None) -> Verdict:
    """Whether the step with (low-rank) gradient ``g`` may be taken: all or nothing, before anything is
    written. On the host (SkipStep, one sync), or on the device when ``ctx.defers_skip(step)``: the header
    then carries the verdict to the moment kernel and the weight update, and a skip is counted in
    ``ctx.pending``. ``ops``: shards whose verdicts must agree (FSDP2). ``peak``: max |g| (0-dim, NaN if g
    holds one) when the caller has it instead of ``g`` (the blocked step)."""
    group = ctx.group
    beta1, beta2 = group["betas"]
    decay = 1.0 - float(group["lr"]) * group["weight_decay"]
    m, v = ctx.moments()
    defer = ctx.defers_skip(step)
    if not defer and (not m.quantized or not ctx.backend.fused):
        # Decided on the host: the CPU paths (a host read costs nothing there), and fp32 state. No header: the
        # moment update takes the step's constants from the step number, as a header would carry them.
        moments_fit(ctx, g, step, ops, peak=peak)
        return Verdict(None, decay)
    # The header reads the moments' peaks from 8-bit state's absmax, or from fp32 state's one-element peaks
    # (√v for v: the header squares it, as for the second moment's stored √v).
    m_peaks, v_peaks = (m.absmax, v.absmax) if m.quantized else (m.peak().reshape(1), v.peak().sqrt().reshape(1))
    header = ctx.backend.step_header(_peak(g, ctx.backend) if peak is None else peak, m_peaks, v_peaks, ctx.pending,
                                     step=step, beta1=beta1, beta2=beta2, bound=adam_update_bound(beta1, beta2, step),
                                     decay=decay, defer=defer)
    if not defer:
        ok = bool(header[HEADER_OK])
        _require(ok if ops is None else ops.all_true(ok, header.device))
        return Verdict(header, decay)
    # Deferred: N = 0 on a skip; decay needs the device's verdict only when there is a decay to gate.
    return Verdict(header, header[HEADER_DECAY] if decay != 1.0 else decay)


def _peak(g: torch.Tensor, backend: Backend) -> torch.Tensor:
    """max |g| (0-dim; NaN if g holds one): one reduction with no temporary (vector_norm's inf-norm), except on
    a CPU, where aminmax (one read-only pass, NaN propagated) is 10x faster than the inf-norm and 2x faster than
    abs().amax()."""
    if g.device.type == "cpu" and not backend.fused and g.numel():
        low, high = torch.aminmax(g)
        return torch.maximum(high, low.neg())
    return torch.linalg.vector_norm(g, float("inf"))


def moment_update(ctx: ParamStep, g: torch.Tensor, step: int, verdict: Verdict,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Adam's moments updated in place with ``g`` (unless the verdict is a deferred skip); returns the
    bounded normalized update N (fp32; into ``out`` when given, which may be ``g``)."""
    beta1, beta2 = ctx.group["betas"]
    m, v = ctx.moments()
    token = ctx.observer.moments_before(ctx, step) if ctx.observer is not None else None
    if m.quantized:
        N = ctx.backend.moment_update_8bit(g, m.codes, m.absmax, v.codes, v.absmax, beta1=beta1, beta2=beta2,
                                           eps=ctx.group["eps"], block_size=ctx.block_size, step=step,
                                           bound=adam_update_bound(beta1, beta2, step), header=verdict.header,
                                           numerics=ctx.state["numerics"], out=out)
    else:
        m32, v32 = m.load(), v.load()
        N = _moment_update_32bit(ctx, m32, v32)(g, m32, v32, beta1=beta1, beta2=beta2, eps=ctx.group["eps"],
                                                step=step, bound=adam_update_bound(beta1, beta2, step),
                                                numerics=ctx.state["numerics"], header=verdict.header)
    if token is not None:
        ctx.observer.moments_after(ctx, token, g, step)
    return N


def _moment_update_32bit(ctx: ParamStep, m: torch.Tensor, v: torch.Tensor):
    """The backend's fp32-moment update (one Triton launch on the fused path), or the torch twin for moments
    held in a strided layout (the kernel updates contiguous state in place)."""
    return ctx.backend.moment_update_32bit if m.is_contiguous() and v.is_contiguous() else Fn.moment_update_32bit


def _scratch(ctx: ParamStep, t: torch.Tensor) -> torch.Tensor | None:
    """``t`` itself as the destination of N when the step owns it (an fp32 temporary nobody reads after the
    moment update: N is written over it, saving an a×r buffer), else None."""
    owned = ctx.observer is None and t.dtype == torch.float32 and t.is_contiguous()
    return t if owned else None


def rotate_moments(ctx: ParamStep, C: torch.Tensor, dim: int) -> None:
    """m <- m C, v <- v (C∘C) along the moments' rank dimension ``dim`` (1 for a matrix's a×r moments, 0
    or 1 for a Tucker core): the moments re-expressed in the new projector's basis."""

    def along(t: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return (t.movedim(dim, -1) @ R).movedim(-1, dim)

    m, v = ctx.moments()
    m.store(along(m.load(), C))
    v.store(along(v.load(), C * C).clamp_min_(0.0))


# ---------------------------------------------------------------------------------------------- projector
def quantize_projector(ctx: ParamStep, name: str, P: torch.Tensor, sr_seed: int | None) -> PendingProjector:
    """A new projector as it will be stored (8-bit: quantized into fresh codes), not yet in the state:
    the step commits it only once it is known to succeed."""
    P = P.to(torch.float32)
    view = ctx.projector(name)
    if not view.quantized:
        return PendingProjector(name, P, P)
    noise = proj.seeded_uniform(tuple(P.shape), sr_seed, P.device) if sr_seed is not None else None
    codes, absmax = view.quantize(P, noise)
    stored = ctx.backend.dequantize(codes, absmax, signed=True, block_size=ctx.block_size)
    return PendingProjector(name, P, stored, codes, absmax)


def commit_projector(ctx: ParamStep, pending: PendingProjector, step: int) -> None:
    """Write a pending projector into the state (rotating the moments into its basis if asked)."""
    view, first = ctx.projector(pending.name), ctx.state["step"] == 0
    P_old = None
    if not first and (ctx.group["rotate_moments"] or ctx.observer is not None):
        P_old = ctx.load_projector(pending.name)
        P_old = P_old if view.quantized else P_old.clone()  # fp32: the held tensor, about to be overwritten
    if pending.codes is None:
        view.store(pending.P)
    else:
        view.store_quantized(pending.codes, pending.absmax)
    ctx._loaded = {key: t for key, t in ctx._loaded.items() if key[0] != pending.name}  # stale copies of P_old
    ctx._loaded[(pending.name, torch.float32)] = pending.P
    if ctx.group["rotate_moments"] and P_old is not None:
        rotate_moments(ctx, proj.rotation(P_old, pending.P), dim=MOMENT_RANK_DIM[pending.name])
    if ctx.observer is not None:
        ctx.observer.projector_committed(ctx, pending, P_old, step)


def refresh_projector(ctx: ParamStep, G: torch.Tensor, S_old: torch.Tensor | None, P_old: torch.Tensor | None,
                      step: int, name: str, rank: int, ops: dist_.LocalMatrix) -> PendingProjector | None:
    """The refreshed projector (r×b) of canonical gradient G (a×b) at ``step``, pending (not yet stored),
    or None when none is due. ``ops``: the math for this process's part of G (``distributed.matrix_ops``).
    Raises SkipStep rather than run QR/SVD on non-finite data. Tucker factors get no SGD step."""
    event = refresh_event(step, ctx.group)
    if event is None or (event == "sgd" and name != "proj"):
        return None
    group, sr_seed = ctx.group, None
    if event == "init":
        # Seeded from (seed, seed_key): the same Ω on every rank, so FSDP2 shards agree on P.
        omega = proj.seeded_normal((ops.width(G), rank), ctx.seed(0, SEED_INIT), G.device)
        sketch = ops.sketch(G, omega)
        _require(ops.all_finite(sketch))
        P_new = proj.canonical_signs(ops.range_finder(G, sketch, rank, group["power_iters"]))
    elif event == "reproject":
        _require(ops.all_finite(S_old))
        P_new = proj.align_signs(ops.range_finder(G, S_old, rank, group["power_iters"]), P_old)
    else:
        _require(ops.all_finite(S_old))
        P_new, _ = ops.sgd_step(G, S_old, ctx.moments()[0].load(), P_old, lr=group["proj_lr"],
                                max_grad_norm=group["proj_max_grad_norm"], objective=group["proj_objective"])
        sr_seed = ctx.seed(step, SEED_PROJ_SR) if group["proj_rounding"] == "stochastic" else None
    _require(bool(torch.isfinite(P_new).all()))  # P is replicated: every rank decides alike
    return quantize_projector(ctx, name, P_new, sr_seed)


# ---------------------------------------------------------------------------------------------- rules
def project_gradient(ctx: ParamStep, grad: torch.Tensor, step: int, *, refresh: bool,
                     P: torch.Tensor | None = None) -> LowRankGradient:
    """Low-rank gradient S = G Pᵀ (fp32, a×r) of a "matrix" parameter for its step number ``step``. With
    ``refresh`` the projector is first initialised / SGD-stepped / re-projected from this gradient when
    ``step`` is due; the new projector is returned pending, to be committed by :func:`apply_lowrank`.
    Without it the given ``P`` (or the stored one) is used as it is (e.g. later micro-batches of an
    accumulated step). Raises SkipStep on non-finite data; writes no state."""
    layout, ops = ctx.layout, ctx.ops
    G = proj.canonical(dist_.local(grad), layout)
    pending = None
    if refresh and ctx.state["step"] == 0:  # first step (or first one not skipped): initial projector
        _require(ops.all_finite(G))
        pending = refresh_projector(ctx, G, None, None, 1, "proj", layout.rank, ops)
        P = pending.P
    elif P is None:  # fp32 for the refresh math when one is due, else in the GEMM's dtype
        due = refresh and refresh_event(step, ctx.group) is not None
        P = ctx.load_projector("proj", torch.float32 if due else G.dtype)
    S = ops.lowrank(G, P)
    if refresh and ctx.state["step"] > 0:
        pending = refresh_projector(ctx, G, S, P, step, "proj", layout.rank, ops)
        if pending is not None:
            P = pending.P
            S = ops.lowrank(G, P)
    return LowRankGradient(S, P, pending)


def apply_lowrank(ctx: ParamStep, lowrank: LowRankGradient, step: int) -> None:
    """Commit a pending projector, update the moments with the low-rank gradient S, then
    W <- (1-lr·wd) W - lr·scale · N P. Nothing is written when the moments would not stay finite (a
    non-finite S included): SkipStep, or on the fused path a skip decided on the device (see
    :func:`decide_step`). S is overwritten by N."""
    group, layout, ops = ctx.group, ctx.layout, ctx.ops
    verdict = decide_step(ctx, lowrank.S, step, ops)
    if lowrank.pending is not None:
        commit_projector(ctx, lowrank.pending, step)
    N = moment_update(ctx, lowrank.S, step, verdict, out=_scratch(ctx, lowrank.S))
    # FSDP2: this shard's rows of W (right) or its columns of canonical Wᵀ with P's matching columns (left).
    Fn.apply_matrix_update_(proj.canonical(dist_.local(ctx.p), layout), N, ops.cols(lowrank.P), lr=group["lr"],
                            weight_decay=group["weight_decay"], scale=group["scale"],
                            sr_seed=ctx.param_sr_seed(step), decay=verdict.decay, update_=ctx.backend.weight_update_,
                            index_strides=(1, layout.a) if layout.transposed else (layout.b, 1))


# ---------------------------------------------------------------------------------------------- blocked step
def blocked_rows(ctx: ParamStep) -> list[slice] | None:
    """The row blocks of the blocked matrix step for this parameter (``projection.step_row_blocks``), or None:
    the unblocked step (a×r within ``projection.STEP_BLOCK_ELEMS``; FSDP2 shards; a quantization-error
    observer, which measures whole tensors)."""
    if ctx.kind != Kind.MATRIX or ctx.shard is not None or ctx.observer is not None:
        return None
    lay = ctx.layout
    return proj.step_row_blocks(lay.a, lay.b, lay.rank, ctx.block_size)


def _projector_as(ctx: ParamStep, dtype: torch.dtype) -> torch.Tensor:
    """The stored projector in ``dtype``, not cached in the context (the blocked step frees it when done;
    under fp32 state the state's own tensor when ``dtype`` is fp32: read only)."""
    view = ctx.projector("proj")
    if not view.quantized:
        return view.load().to(dtype)
    return ctx.backend.dequantize(view.codes, view.absmax, signed=True, block_size=ctx.block_size, dtype=dtype)


def _fp32_rows(G: torch.Tensor, rows: slice) -> torch.Tensor:
    return G[rows].to(torch.float32)


def _moment_rows(ctx: ParamStep, g: torch.Tensor, rows: slice, step: int, verdict: Verdict) -> torch.Tensor:
    """:func:`moment_update` of the moments' rows ``rows`` (a contiguous slice of the codes and absmax:
    ``step_row_blocks`` aligns the blocks); N written over ``g`` (fp32, contiguous, the step's own)."""
    beta1, beta2 = ctx.group["betas"]
    m, v = ctx.moments()
    if m.quantized:
        r, bs = g.shape[1], ctx.block_size
        blocks = slice(rows.start * r // bs, -(-rows.stop * r // bs))
        return ctx.backend.moment_update_8bit(g, m.codes[rows], m.absmax[blocks], v.codes[rows], v.absmax[blocks],
                                              beta1=beta1, beta2=beta2, eps=ctx.group["eps"], block_size=bs,
                                              step=step, bound=adam_update_bound(beta1, beta2, step),
                                              header=verdict.header, numerics=ctx.state["numerics"], out=g)
    m32, v32 = m.load()[rows], v.load()[rows]
    return _moment_update_32bit(ctx, m32, v32)(g, m32, v32, beta1=beta1, beta2=beta2, eps=ctx.group["eps"],
                                               step=step, bound=adam_update_bound(beta1, beta2, step),
                                               numerics=ctx.state["numerics"], header=verdict.header)


def _update_rows(ctx: ParamStep, W: torch.Tensor, N: torch.Tensor, P_w: torch.Tensor, rows: slice, step: int,
                 verdict: Verdict) -> None:
    """W[rows] <- decay·W[rows] - lr·scale·N P on the canonical view W (a×b): ``functional.apply_matrix_update_``
    for those rows, with the stochastic rounding's hash counting each element at its index in the whole weight
    (so the bits are the unblocked step's). ``P_w``: P in W's dtype."""
    group, layout = ctx.group, ctx.layout
    if W.dtype in (torch.float32, torch.float64):
        Fn.apply_matrix_update_(W[rows], N, P_w, lr=group["lr"], weight_decay=group["weight_decay"],
                                scale=group["scale"], sr_seed=None, decay=verdict.decay)
        return
    strides = (1, layout.a) if layout.transposed else (layout.b, 1)  # canonical (i, j) -> weight element
    kw = dict(decay=verdict.decay, alpha=-group["lr"] * group["scale"], sr_seed=ctx.param_sr_seed(step),
              offset=rows.start * strides[0], index_strides=strides)
    U = N.to(W.dtype) @ P_w
    block = W[rows]
    if block.is_contiguous():
        ctx.backend.weight_update_(block, U, **kw)
        return
    work = block.contiguous()  # (a left-projected weight's canonical rows are its columns)
    ctx.backend.weight_update_(work, U, **kw)
    del U
    block.copy_(work)


def _apply_blocked(ctx: ParamStep, G: torch.Tensor, P: torch.Tensor, pending: PendingProjector | None, step: int,
                   blocks: list[slice], max_norm: float | None) -> None:
    """:func:`apply_lowrank` by row blocks, S never whole: pass 1 computes max |S| (and ‖S‖ when clipping to
    ``max_norm``) for the all-or-nothing decision; then the pending projector is committed and pass 2
    recomputes each block of S = G Pᵀ, updates its moments (N over S) and its rows of W. The blocks are the
    refresh's merged by ``projection.STEP_APPLY_BLOCKS``."""
    layout = ctx.layout
    blocks = proj.merge_blocks(blocks)
    P_g = P.to(G.dtype)
    peak, sq = None, None
    for rows in blocks:
        S = G[rows] @ P_g.mT  # (in G's dtype: its max |·| is that of its fp32 cast)
        blk = _peak(S, ctx.backend).to(torch.float32)
        peak = blk if peak is None else torch.maximum(peak, blk)
        if max_norm is not None:
            n2 = torch.linalg.vector_norm(S, dtype=torch.float64).square()
            sq = n2 if sq is None else sq + n2
        del S
    factor = None
    if max_norm is not None:  # inbackward.clip_norm_'s rule on the whole S
        norm = math.sqrt(float(sq))
        if math.isfinite(norm) and norm > max_norm:
            factor = max_norm / (norm + 1e-6)
            peak = peak * factor
    verdict = decide_step(ctx, None, step, peak=peak)
    if pending is not None:
        commit_projector(ctx, pending, step)
    W = proj.canonical(dist_.local(ctx.p), layout)
    P_w = P_g if W.dtype == G.dtype else P.to(W.dtype)
    for rows in blocks:
        S = (G[rows] @ P_g.mT).to(torch.float32)
        if factor is not None:
            S.mul_(factor)
        N = _moment_rows(ctx, S, rows, step, verdict)
        _update_rows(ctx, W, N, P_w, rows, step, verdict)
        del S, N


def _quantize_projector_blocked(ctx: ParamStep, holder: list[torch.Tensor], sr_seed: int | None) -> PendingProjector:
    """:func:`quantize_projector` of the projector in ``holder`` (taken out of it: the only reference) holding
    less at once: it and the noise are freed before the dequantization, and the pending projector keeps no
    unrounded copy (``target`` is the stored value; no observer reads it)."""
    P = holder.pop()
    view = ctx.projector("proj")
    if not view.quantized:
        return PendingProjector("proj", P, P)
    noise = proj.seeded_uniform(tuple(P.shape), sr_seed, P.device) if sr_seed is not None else None
    codes, absmax = view.quantize(P, noise)
    del noise, P
    stored = ctx.backend.dequantize(codes, absmax, signed=True, block_size=ctx.block_size)
    return PendingProjector("proj", stored, stored, codes, absmax)


def _finite0d(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool, no temporary of t's size: whether t is finite (vector_norm's inf-norm propagates NaN)."""
    return torch.isfinite(torch.linalg.vector_norm(t, float("inf")))


def _refresh_blocked(ctx: ParamStep, G: torch.Tensor, event: str, step: int, blocks: list[slice]) -> torch.Tensor:
    """The refreshed projector (fp32 r×b, not quantized) of the blocked step: the range finder from YᵀY and
    YᵀG (``projection.GramSketch``), or the SGD step from two passes (``projection.BlockedProjectorStep``).
    Raises SkipStep on non-finite data (checked on sums over the blocks: a non-finite entry makes them so)."""
    group, rank, b = ctx.group, ctx.layout.rank, ctx.layout.b
    finite = []
    if event in ("init", "reproject"):
        sketch = proj.GramSketch(rank, b, G.device)
        if event == "init":  # the unblocked step's Ω: seeded, the same on every process
            omega = proj.seeded_normal((b, rank), ctx.seed(0, SEED_INIT), G.device)
            for rows in blocks:
                G32 = _fp32_rows(G, rows)
                finite.append(_finite0d(G32))
                sketch.add_rows(G32 @ omega, G32)
                del G32
            del omega
        else:  # warm start: Y = S = G P_oldᵀ, the GEMM in G's dtype as the unblocked step's S
            P_g = _projector_as(ctx, G.dtype)
            for rows in blocks:
                G32 = _fp32_rows(G, rows)
                sketch.add_rows((G[rows] @ P_g.mT).to(torch.float32), G32)
                del G32
            del P_g
        finite.append(sketch.finite())
        _require(bool(torch.stack(finite).all()))
        for _ in range(group["power_iters"]):  # Q ← qr(G qr(Gᵀ Q)): one more pass over G each
            Z = sketch.power_basis()
            sketch = proj.GramSketch(rank, b, G.device)
            for rows in blocks:
                G32 = _fp32_rows(G, rows)
                sketch.add_rows(G32 @ Z, G32)
                del G32
            del Z
            _require(bool(sketch.finite()))
        P_new = sketch.gram_projector(rank)
        del sketch
        if event == "init":
            return proj.canonical_signs_(P_new)
        return proj.align_signs_(P_new, _projector_as(ctx, torch.float32))
    # "sgd": S in fp32 (G's fp32 rows times the fp32 P), so that ⟨P, SᵀG⟩ = Σ‖S_i‖² holds to fp32 rounding.
    P = _projector_as(ctx, torch.float32)
    m = ctx.moments()[0]
    M_rows = _moment_rows_loader(ctx, m, rank)
    sgd = proj.BlockedProjectorStep(P, objective=group["proj_objective"])
    for rows in blocks:
        G32 = _fp32_rows(G, rows)
        S = G32 @ P.mT
        finite.append(_finite0d(S))
        sgd.loss_terms(S, M_rows(rows), G32)
        del G32, S
    _require(bool(torch.stack(finite).all()))
    sgd.loss_weights()
    for rows in blocks:
        G32 = _fp32_rows(G, rows)
        S = G32 @ P.mT
        sgd.gradient_terms(S, M_rows(rows), G32)
        del G32, S
    return sgd.stepped(P, lr=group["proj_lr"], max_grad_norm=group["proj_max_grad_norm"])


def _moment_rows_loader(ctx: ParamStep, m: StateTensor, rank: int):
    """rows -> the first moment's rows in fp32 (dequantized from their codes' slice under 8-bit)."""
    if not m.quantized:
        return lambda rows: m.load()[rows]
    bs = ctx.block_size

    def load(rows: slice) -> torch.Tensor:
        blocks = slice(rows.start * rank // bs, -(-rows.stop * rank // bs))
        return ctx.backend.dequantize(m.codes[rows], m.absmax[blocks], signed=True, block_size=bs)

    return load


def step_matrix_blocked(ctx: ParamStep, grad: torch.Tensor, step: int, blocks: list[slice] | None = None, *,
                        max_norm: float | None = None) -> None:
    """One step of a large "matrix" parameter held whole, one block of canonical rows at a time (the same math
    as :func:`project_gradient` + :func:`apply_lowrank`, with every a×r and a×b temporary replaced by block-sized
    ones and sums over blocks; fp32 summation order differs, so results agree within rounding, not bit for
    bit). All or nothing as the unblocked step; on the fused path a non-refresh step still decides a skip on the
    device. ``max_norm``: clip the low-rank gradient S to that norm first (in-backward's ``max_grad_norm``)."""
    blocks = blocked_rows(ctx) if blocks is None else blocks
    G = proj.canonical(dist_.local(grad), ctx.layout)
    event = "init" if ctx.state["step"] == 0 else refresh_event(step, ctx.group)
    pending = None
    if event is None:
        P = _projector_as(ctx, G.dtype)
    else:
        holder = [_refresh_blocked(ctx, G, event, step, blocks)]
        _require(bool(_finite0d(holder[0])))
        sr_seed = None
        if event == "sgd" and ctx.group["proj_rounding"] == "stochastic":
            sr_seed = ctx.seed(step, SEED_PROJ_SR)
        pending = _quantize_projector_blocked(ctx, holder, sr_seed)
        P = pending.P
    _apply_blocked(ctx, G, P, pending, step, blocks, max_norm)


def _step_matrix(ctx: ParamStep, grad: torch.Tensor, step: int) -> None:
    blocks = blocked_rows(ctx)
    if blocks is not None:
        step_matrix_blocked(ctx, grad, step, blocks)
        return
    apply_lowrank(ctx, project_gradient(ctx, grad, step, refresh=True), step)


def _step_tucker(ctx: ParamStep, grad: torch.Tensor, step: int) -> None:
    """Conv weight (O, I, kh, kw): moments live on the core C = G ×₀ U0ᵀ ×₁ U1ᵀ (r0, r1, kh, kw), the update
    is N ×₀ U0 ×₁ U1. Each factor U_k is maintained as the projector of the mode-k unfolding (transposed so
    it is canonical): initial and warm-started re-projection as for matrices; the correlation-aware SGD
    step is a matrix-only feature."""
    group, first = ctx.group, ctx.state["step"] == 0
    if first or refresh_event(step, group) == "reproject":  # QR/SVD below: finite data only
        _require(bool(torch.isfinite(grad).all()))  # (otherwise moments_fit on the core decides)
    G = grad.to(torch.float32)
    factors, pendings = [], []
    for mode, r in enumerate(tucker_ranks(ctx.p.shape, group)):
        name = f"factor{mode}"
        unfold = G.movedim(mode, 0).reshape(G.shape[mode], -1).mT  # (rest, dim_mode)
        U = None if first else ctx.load_projector(name)
        pending = refresh_projector(ctx, unfold, None if U is None else unfold @ U.mT, U, step, name, r,
                                    dist_.LocalMatrix())
        if pending is not None:
            pendings.append(pending)
            U = pending.P
        factors.append(U)
    U0, U1 = factors
    core = torch.einsum("oikl,ao,bi->abkl", G, U0, U1)
    verdict = decide_step(ctx, core, step)
    for pending in pendings:
        commit_projector(ctx, pending, step)
    N = moment_update(ctx, core, step, verdict, out=_scratch(ctx, core))
    full = torch.einsum("abkl,ao,bi->oikl", N, U0, U1).mul_(group["scale"])
    Fn.apply_dense_update_(ctx.p, full, lr=group["lr"], weight_decay=group["weight_decay"],
                           sr_seed=ctx.param_sr_seed(step), decay=verdict.decay, update_=ctx.backend.weight_update_)


def _step_dense(ctx: ParamStep, grad: torch.Tensor, step: int) -> None:
    group = ctx.group
    p, grad = dist_.local(ctx.p), dist_.local(grad)  # FSDP2: Adam is elementwise, so the shard steps alone
    # ... but all ranks skip together: shards' step counts stay equal.
    verdict = decide_step(ctx, grad, step, ctx.shard)
    sr_seed = ctx.param_sr_seed(step)
    if _DENSE8_BNB_FUSED and ctx.kind == Kind.DENSE8 and sr_seed is None and p.is_contiguous() and grad.is_contiguous():
        _bnb_fused_dense8(ctx, p, grad, step)  # ablation only
        return
    N = moment_update(ctx, grad, step, verdict)  # (the gradient is the caller's: N gets its own buffer)
    Fn.apply_dense_update_(p, N, lr=group["lr"], weight_decay=group["weight_decay"], sr_seed=sr_seed,
                           decay=verdict.decay, update_=ctx.backend.weight_update_)


def _bnb_fused_dense8(ctx: ParamStep, p: torch.Tensor, grad: torch.Tensor, step: int) -> None:
    """bitsandbytes' fused blockwise kernel, 0.1.0's dense8 path (see _DENSE8_BNB_FUSED)."""
    import bitsandbytes.functional as bnbf

    from .format import _code_map_cpu, code_map

    group, (m, v) = ctx.group, ctx.moments()
    beta1, beta2 = group["betas"]
    bnbf.optimizer_update_8bit_blockwise(
        "adam", grad, p, m.codes, v.codes, beta1, beta2, 0.0, 0.0, group["eps"], step, group["lr"],
        code_map(True, p.device), _code_map_cpu(False, True).to(p.device), m.absmax, v.absmax,
        weight_decay=group["weight_decay"],
    )


_RULES = {Kind.MATRIX: _step_matrix, Kind.TUCKER: _step_tucker, Kind.DENSE8: _step_dense,
          Kind.DENSE32: _step_dense}


def take_step(ctx: ParamStep, grad: torch.Tensor) -> None:
    """One optimizer step of one parameter, all or nothing: raises SkipStep / LinAlgError with the
    parameter and its state untouched, else advances ``state["step"]`` (also when the step was skipped on the
    device: ``ctx.pending`` then counts it, until the optimizer settles it)."""
    step = ctx.state["step"] + 1
    _RULES[ctx.kind](ctx, grad, step)
    ctx.state["step"] = step
