# Writes tests/data/coap8bit-0.1.0-state.pt with coap8bit 0.1.0 (git 580d0e6): 3 steps of AdamW8bit on a
# projected matrix, an unprojected 8-bit vector and a small fp32-state vector.
import sys

import torch

import coap8bit

assert coap8bit.__file__.startswith("/tmp/v010"), coap8bit.__file__
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(48, 80), (6000,), (300,)]]
opt = coap8bit.AdamW8bit(params, lr=1e-2, min_proj_size=256, backend="torch")
for t in range(3):
    g2 = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g2) * torch.logspace(-4, 0, p.shape[-1])
    opt.step()
torch.save({"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict()}, sys.argv[1])
