"""Small helpers shared by the tests."""

import torch

from net_params import Conv, Preset, Stage


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


def small_original(cell: str, **options) -> Preset:
    """The original's stage layout (stride 1, 2, 2; transposed ups) at a fraction of the width."""
    return Preset(
        cell=cell,
        stages=[Stage(down=Conv(1, 4, 3), hidden=8, up=Conv(8, 4, 3)),
                Stage(down=Conv(8, 8, 3, stride=2), hidden=12,
                      up=Conv(12, 12, 4, stride=2, transposed=True)),
                Stage(down=Conv(12, 12, 3, stride=2), hidden=12,
                      up=Conv(12, 12, 4, stride=2, transposed=True))],
        head=[Conv(4, 1, 1)], cell_kernel=3, norm="group", cell_options=options,
        image_size=16)


# A child process that runs main.py with a pause after every training step, long enough for a
# signal to arrive mid-epoch, and appends the step's number to the file in argv[1] (rank 0's,
# under torchrun). Run it as `python slow_steps.py STEPS_FILE SECONDS MAIN_FLAGS...` with the
# repository on PYTHONPATH (write it to a file first: torchrun needs a script).
SLOW_STEPS = """
import os, sys, time
import main
from utils import run_cli
real, steps = main.train_step, [0]
def slow(*args, **kwargs):
    loss = real(*args, **kwargs)
    steps[0] += 1
    if os.environ.get("RANK", "0") == "0":
        with open(sys.argv[1], "a") as f:
            f.write(f"{steps[0]}\\n")
    time.sleep(float(sys.argv[2]))
    return loss
main.train_step = slow
sys.exit(run_cli(main.main, sys.argv[3:]))
"""


def steps_done(path) -> int:
    """How many steps a SLOW_STEPS child reported."""
    return len(path.read_text().split()) if path.exists() else 0
