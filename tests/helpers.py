"""Small helpers shared by the tests."""

import torch


def randomize(module, seed=0, std=0.3):
    """Non-trivial values everywhere: peephole weights, norm affines and zero-initialised
    convolutions (TrajGRU's last flow conv) included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def said(stderr: str) -> list[str]:
    """The lines a CLI said to the user (`error: ...`, `interrupted: ...`), not progress bars."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:"))]
