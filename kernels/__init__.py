"""Triton kernels of coap8bit, shipped as ``coap8bit.kernels`` (this folder is ``kernels/`` in the repo).

Never importable as a top-level ``kernels``: that name belongs to Hugging Face's package, which
bitsandbytes and transformers import.
"""
if __name__ != "coap8bit.kernels":
    raise ImportError(
        f"this package must be imported as 'coap8bit.kernels', not {__name__!r}: a top-level 'kernels' "
        "would shadow the Hugging Face 'kernels' package. Install coap8bit (pip install -e .) and use "
        "'import coap8bit.kernels'."
    )
