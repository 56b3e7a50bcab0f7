"""Blockwise 8-bit quantization against a brute-force nearest-code oracle, and its table lookup against the
binary search it replaced, on every value where either could change its answer."""
import pytest
import torch
from coap8bit.kernels import quant as KQ
from hypothesis import given, settings
from hypothesis import strategies as st

from coap8bit import format as fmt
from coap8bit.quant import QUANT_ZERO_SIGNED, code_map, dequantize_blockwise, num_blocks, quantize_blockwise


def brute_force_codes(x: torch.Tensor, signed: bool, block_size: int) -> torch.Tensor:
    """Nearest code by exhaustive distance to all 256 codes; under the signed map a non-zero value may
    only take a code of its own sign (the format's sign-preservation rule)."""
    code = code_map(signed).double()
    flat = x.reshape(-1).double()
    out = torch.empty(flat.numel(), dtype=torch.long)
    for start in range(0, flat.numel(), block_size):
        blk = flat[start : start + block_size]
        amax = blk.abs().max()
        normed = blk / amax if amax > 0 else blk
        dist = (normed.unsqueeze(1) - code.unsqueeze(0)).abs()
        if signed:
            wrong_sign = ((normed.unsqueeze(1) > 0) & (code.unsqueeze(0) <= 0)) | (
                (normed.unsqueeze(1) < 0) & (code.unsqueeze(0) >= 0))
            dist = torch.where(wrong_sign, torch.full_like(dist, float("inf")), dist)
        out[start : start + block_size] = dist.argmin(dim=1)
    return out.view(x.shape)


SHAPES = [(1,), (7,), (255,), (256,), (257,), (3, 100), (1, 513), (33, 17)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [32, 256])
def test_codes_match_brute_force_nearest(shape, signed, block_size):
    gen = torch.Generator().manual_seed(hash((shape, signed, block_size)) % 2**31)
    x = torch.randn(shape, generator=gen) * torch.logspace(-6, 2, shape[-1]).expand(shape)
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise(x, signed=signed, block_size=block_size)
    expected = brute_force_codes(x, signed, block_size)
    code = code_map(signed).double()
    # Ties between two codes may resolve either way in fp32; allow a mismatch only where the two codes
    # are equally near (within 1e-6 of the block-normalized distance).
    mismatch = codes.long() != expected
    if mismatch.any():
        xs = x.reshape(-1).double()
        blocks = torch.arange(xs.numel()) // block_size
        normed = xs / absmax.double()[blocks].clamp_min(1e-300)
        got = (normed - code[codes.reshape(-1).long()]).abs()
        want = (normed - code[expected.reshape(-1)]).abs()
        assert torch.all((got - want).abs()[mismatch.reshape(-1)] < 1e-6)
    assert absmax.dtype == torch.float32 and absmax.numel() == num_blocks(x.numel(), block_size)


def test_signed_map_keeps_sign_of_tiny_values():
    # 1e-12 next to 1.0 in one block is far below the smallest non-zero code (~5.5e-7): nearest would be 0.
    x = torch.tensor([1.0, 1e-12, -1e-12, 0.0])
    codes, _ = quantize_blockwise(x, signed=True, block_size=32)
    assert codes[1] == QUANT_ZERO_SIGNED + 1 and codes[2] == QUANT_ZERO_SIGNED - 1 and codes[3] == QUANT_ZERO_SIGNED
    back = dequantize_blockwise(codes, _, signed=True, block_size=32)
    assert back[1] > 0 and back[2] < 0 and back[3] == 0


def test_unsigned_rejects_negative():
    with pytest.raises(ValueError, match="non-negative"):
        quantize_blockwise(torch.tensor([-1.0, 2.0]), signed=False)


def test_dequantize_checks_inputs():
    codes, absmax = quantize_blockwise(torch.randn(300), signed=True, block_size=256)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_blockwise(codes.float(), absmax, signed=True)
    with pytest.raises(ValueError, match="blocks"):
        dequantize_blockwise(codes, absmax[:1], signed=True, block_size=256)


@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_error_small(signed):
    # Dynamic map: relative L2 error of Gaussian data at block 256 is about 1% (bnb's figure); bound 2%.
    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, signed=signed)
    err = (dequantize_blockwise(codes, absmax, signed=signed) - x).norm() / x.norm()
    assert err < 0.02


def test_all_zero_block():
    codes, absmax = quantize_blockwise(torch.zeros(300), signed=True)
    assert torch.all(absmax == 0)
    assert torch.all(dequantize_blockwise(codes, absmax, signed=True) == 0)


def test_stochastic_rounding_is_unbiased_and_reproducible():
    # A value between two codes: the mean over many draws converges to it (standard error ~ gap/sqrt(n)).
    code = code_map(True)
    x = torch.full((20000,), 0.0)
    x[0] = 1.0  # sets absmax of block 0 to 1
    target = float(code[200] * 0.3 + code[201] * 0.7)
    x[1:] = target
    u1 = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    codes1, absmax = quantize_blockwise(x, signed=True, block_size=20000, noise=u1)
    codes2, _ = quantize_blockwise(x, signed=True, block_size=20000, noise=u1.clone())
    assert torch.equal(codes1, codes2)
    vals = dequantize_blockwise(codes1, absmax, signed=True, block_size=20000)[1:]
    assert set(codes1[1:].tolist()) == {200, 201}
    gap = float(code[201] - code[200])
    assert abs(vals.mean().item() - target) < 5 * gap / (19999**0.5)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=2000),
    block_pow=st.integers(min_value=5, max_value=9),
    signed=st.booleans(),
    scale=st.floats(min_value=1e-8, max_value=1e6),
)
def test_property_roundtrip_bound(n, block_pow, signed, scale):
    """Every element dequantizes within half the largest gap of the map times its block's absmax
    (the map's widest gap is near ±1: ~0.0141 of absmax)."""
    block = 2**block_pow
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, signed=signed, block_size=block)
    back = dequantize_blockwise(codes, absmax, signed=signed, block_size=block)
    code = code_map(signed)
    max_gap = float((code[1:] - code[:-1]).max())
    per_elem = absmax.repeat_interleave(block)[:n]
    assert torch.all((back - x).abs() <= per_elem * (max_gap / 2) * (1 + 1e-5) + 1e-30)
    if signed:  # sign preservation: no non-zero value dequantizes to 0 or the opposite sign
        assert torch.all(torch.sign(back) == torch.sign(x))


# ------------------------------------------------------------------------------------------ rounding table
def searched_codes(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """The rounding the table replaced (0.1.0): binary search over the midpoints between codes (ties go down),
    then, under the signed map, a non-zero value moved off the zero code to the nearest code of its sign."""
    code = code_map(signed)
    idx = torch.bucketize(x, (code[1:] + code[:-1]) * 0.5)
    if signed:
        idx = torch.where((x > 0) & (idx <= QUANT_ZERO_SIGNED), QUANT_ZERO_SIGNED + 1, idx)
        idx = torch.where((x < 0) & (idx >= QUANT_ZERO_SIGNED), QUANT_ZERO_SIGNED - 1, idx)
    return idx


def searched_stochastic_codes(x: torch.Tensor, u: torch.Tensor, signed: bool) -> torch.Tensor:
    """0.1.0's stochastic rounding: the codes around x by binary search, the upper one if u < proximity."""
    code = code_map(signed)
    low = (torch.bucketize(x, code, right=True) - 1).clamp(0, 254)
    p_high = ((x - code[low]) / (code[low + 1] - code[low])).clamp(0.0, 1.0)
    return low + (u < p_high).long()


def fp32(bits: torch.Tensor) -> torch.Tensor:
    """fp32 values of 32-bit patterns held in int64."""
    return torch.where(bits < 2**31, bits, bits - 2**32).to(torch.int32).view(torch.float32)


def in_range(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """The map's range: [-1, 1] signed, [0, 1] unsigned (-0.0 included: √ of a -0.0 second moment)."""
    return x[(x >= (-1.0 if signed else 0.0)) & (x <= 1.0)]


def breakpoints(signed: bool) -> torch.Tensor:
    """Every value in the map's range where the table lookup or the search can change its answer, and its
    neighbours. The lookup is monotone within a cell (the 2^16 values sharing their top 16 bits) and steps
    only at a rounding threshold; the search steps only at a midpoint (and, by the sign rule, between 0 and
    the smallest subnormals). So on each piece of a cell between consecutive midpoints both are constant, and
    they agree everywhere iff they agree at both ends of every cell and on both sides of every midpoint and of
    ±0 — these points. Codes and their neighbours, the ends of the subnormal range and 1.0 are added."""
    cell_start = torch.arange(1 << (32 - fmt.SEARCH_CELL_SHIFT), dtype=torch.int64) << fmt.SEARCH_CELL_SHIFT
    cell_ends = fp32(torch.cat([cell_start, cell_start + (1 << fmt.SEARCH_CELL_SHIFT) - 1]))
    code = code_map(signed)
    specials = fp32(torch.tensor([0, 1, 0x007FFFFF, 0x00800000, 0x3F7FFFFF, 0x3F800000]))
    steps = torch.cat([(code[1:] + code[:-1]) * 0.5, code, specials, -specials])
    points = torch.cat([cell_ends, steps, torch.nextafter(steps, torch.tensor(-torch.inf)),
                        torch.nextafter(steps, torch.tensor(torch.inf))])
    return in_range(points, signed)


def strided_sweep(signed: bool, stride: int = 509) -> torch.Tensor:
    """Every ``stride``-th fp32 pattern from +0 to 1.0 (2.1M values; and their negatives under the signed map):
    a check of the argument in :func:`breakpoints` that assumes nothing about where the steps lie."""
    positive = fp32(torch.arange(0, 0x3F800001, stride, dtype=torch.int64))
    return torch.cat([positive, -positive]) if signed else positive


def quantize_normed(x: torch.Tensor, signed: bool, backend: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of ``x`` itself, through the torch path or the Triton kernel: each block of 4096 holds a leading
    1.0 (so absmax is 1 and the normalizing division is exact), then 4095 of x's values."""
    rows = -(-x.numel() // 4095)

    def blocks(values: torch.Tensor, lead: float) -> torch.Tensor:
        body = torch.cat([values, values.new_zeros(rows * 4095 - values.numel())]).view(rows, 4095)
        return torch.cat([torch.full((rows, 1), lead), body], dim=1)

    quantize = quantize_blockwise if backend == "torch" else KQ.quantize_blockwise
    codes, absmax = quantize(blocks(x, 1.0), signed=signed, block_size=4096,
                             noise=None if noise is None else blocks(noise, 0.0))
    assert torch.all(absmax == 1.0)
    return codes[:, 1:].reshape(-1)[: x.numel()].long()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("backend, points", [("torch", breakpoints), ("torch", strided_sweep),
                                             ("triton", breakpoints)])
def test_rounding_table_equals_search_everywhere(signed, backend, points):
    # Exact: the table is a rewrite of the search, not an approximation of it.
    x = points(signed)
    got = quantize_normed(x, signed, backend)
    want = searched_codes(x, signed)
    wrong = (got != want).nonzero().view(-1)
    assert wrong.numel() == 0, (f"{wrong.numel()} of {x.numel()} values round differently, e.g. "
                                f"{x[wrong[:4]].tolist()}: {got[wrong[:4]].tolist()} instead of {want[wrong[:4]].tolist()}")


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("noise", ["zero", "below_one", "uniform"])
def test_stochastic_rounding_equals_search_everywhere(signed, backend, noise):
    # Exact. u = 0 takes the upper code whenever x lies above the lower one, u just below 1 the lower code
    # unless x is the upper one: so the two codes around every breakpoint are both checked.
    x = breakpoints(signed)
    u = {"zero": torch.zeros_like(x), "below_one": torch.full_like(x, 1.0 - 2**-24),
         "uniform": torch.rand(x.shape, generator=torch.Generator().manual_seed(0))}[noise]
    got = quantize_normed(x, signed, backend, noise=u)
    want = searched_stochastic_codes(x, u, signed)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {x.numel()} values round differently"


def test_rounding_table_refuses_cells_too_coarse(monkeypatch):
    # 6 mantissa bits per cell put two midpoints of the unsigned map's top decade (spacing 0.9/128) into cells
    # of width 1/128: the table builder must refuse rather than round wrongly.
    monkeypatch.setattr(fmt, "SEARCH_CELL_SHIFT", fmt.SEARCH_CELL_SHIFT + 1)
    fmt._search_table_cpu.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="two rounding thresholds"):
            fmt._search_table_cpu(False, False, True)
    finally:
        fmt._search_table_cpu.cache_clear()


# ----------------------------------------------------------------------------------------- CPU fast paths
@pytest.mark.parametrize("n, block_size", [(1, 256), (255, 256), (256, 256), (1000, 256), (513, 128), (100, 100),
                                           (4097, 4096), (33 * 17, 32)])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_dequantize_is_the_lookup_bit_for_bit(n, block_size, signed, dtype):
    # On the CPU dequantize_blockwise runs bitsandbytes' kernel: one fp32 product code[c] * absmax per element,
    # the same operation as the torch lookup, so equal bits (tolerance 0). Codes taken non-contiguous too.
    gen = torch.Generator().manual_seed(n * 7 + block_size)
    codes = torch.randint(0, 256, (2 * n,), dtype=torch.uint8, generator=gen)[::2]
    absmax = torch.rand(num_blocks(n, block_size), generator=gen) * 10.0 ** torch.randint(-20, 20, (1,), generator=gen)
    from coap8bit import quant as Q

    got = dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size, dtype=dtype)
    want = Q._dequantize_by_lookup(codes, absmax, code_map(signed), block_size).to(dtype)
    assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want)  # finite values, no -0.0


@given(n=st.integers(1, 700), block_pow=st.integers(2, 9), signed=st.booleans(), zeros=st.sampled_from(["none", "+0", "-0"]),
       exponent=st.integers(-40, 30))
@settings(max_examples=60, deadline=None)
def test_quantize_into_state_equals_a_fresh_quantize(n, block_pow, signed, zeros, exponent):
    # With out_codes the nearest codes are written straight into them (no padding): the same codes and absmax,
    # bit for bit, as a fresh quantize, including blocks of -0.0 (absmax +0.0, as |x|.max() gives).
    block_size = 2**block_pow
    gen = torch.Generator().manual_seed(n * 31 + block_pow)
    x = torch.randn(n, generator=gen) * 10.0**exponent
    if not signed:
        x = x.abs()
    if zeros != "none":
        x[: min(n, block_size)] = 0.0 if zeros == "+0" else -0.0
        if not signed:
            x = x.abs()
    fresh_codes, fresh_absmax = quantize_blockwise(x, signed=signed, block_size=block_size)
    out_codes = torch.full((n,), 77, dtype=torch.uint8)
    out_absmax = torch.full((num_blocks(n, block_size),), 5.0)
    codes, absmax = quantize_blockwise(x, signed=signed, block_size=block_size, out_codes=out_codes,
                                       out_absmax=out_absmax)
    assert codes is out_codes and absmax is out_absmax
    assert torch.equal(codes, fresh_codes) and torch.equal(absmax.view(torch.int32), fresh_absmax.view(torch.int32))
    assert torch.equal(absmax.view(torch.int32), x.reshape(-1).abs().new_zeros(num_blocks(n, block_size) * block_size)
                       .index_copy_(0, torch.arange(n), x.reshape(-1).abs()).view(-1, block_size).amax(dim=1)
                       .view(torch.int32))
