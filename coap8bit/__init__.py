"""coap8bit: COAP (correlation-aware gradient projection) AdamW with 8-bit low-rank state."""
from .inbackward import InBackward, attach
from .optimizer import AdamW, AdamW8bit, COAPAdamW

__version__ = "0.2.0.dev0"
__all__ = ["AdamW8bit", "AdamW", "COAPAdamW", "InBackward", "attach", "__version__"]
