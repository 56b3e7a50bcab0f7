"""What every kernel launcher checks before handing raw memory to a kernel (Triton's or the native one):
the block size and each tensor's dtype, size, device and contiguity. Free of Triton, so that the native CPU
kernel's launcher does not import it."""
import torch

__all__ = ["BLOCK_SIZE_MIN", "BLOCK_SIZE_MAX", "check_block_size", "check_tensor", "check_moment_state"]

# Block sizes the kernels accept: tl.arange needs a power of two; the range is the optimizer's.
BLOCK_SIZE_MIN, BLOCK_SIZE_MAX = 32, 4096


def check_block_size(block_size: int) -> None:
    if not (isinstance(block_size, int) and BLOCK_SIZE_MIN <= block_size <= BLOCK_SIZE_MAX
            and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two in [{BLOCK_SIZE_MIN}, {BLOCK_SIZE_MAX}] for the "
                         f"fused kernels, got {block_size!r}")


def check_tensor(name: str, t: torch.Tensor, *, dtypes: tuple[torch.dtype, ...], numel: int,
                 device: torch.device) -> None:
    """Raise a clear error unless ``t`` is a contiguous tensor of one of ``dtypes`` with ``numel``
    elements on ``device`` (the kernels index flat memory)."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one device)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel reads flat memory); pass {name}.contiguous()")


def check_moment_state(g: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor, v_codes: torch.Tensor,
                       v_absmax: torch.Tensor, *, block_size: int, grad_dtypes: tuple[torch.dtype, ...],
                       device: torch.device) -> int:
    """The fused 8-bit moment update's inputs (Triton's and the native one): the block size, ``g`` (contiguous,
    one of ``grad_dtypes``), uint8 codes with g's number of elements, fp32 absmax with one entry per block, all
    on ``device``. Returns the number of blocks."""
    check_block_size(block_size)
    n = g.numel() if torch.is_tensor(g) else 0
    n_blocks = -(-n // block_size)
    check_tensor("g", g, dtypes=grad_dtypes, numel=n, device=device)
    check_tensor("m_codes", m_codes, dtypes=(torch.uint8,), numel=n, device=device)
    check_tensor("v_codes", v_codes, dtypes=(torch.uint8,), numel=n, device=device)
    check_tensor("m_absmax", m_absmax, dtypes=(torch.float32,), numel=n_blocks, device=device)
    check_tensor("v_absmax", v_absmax, dtypes=(torch.float32,), numel=n_blocks, device=device)
    return n_blocks
