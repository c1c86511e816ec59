"""Demo of the porting path (the main job until the training pipeline lands):

    python -m convert.demo [OUT_DIR]

saves a randomly initialised torchvision ResNet-18 state_dict, ports it with
`python -m convert`, and prints the largest logit difference on a random batch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision

from agre_jax import checkpoints, models


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2).eval()
    src = out / "resnet18.pt"
    torch.save(net.state_dict(), src)
    dst = out / "resnet18"
    cmd = [
        sys.executable,
        "-m",
        "convert",
        "--arch",
        "resnet18",
        "--num-classes",
        "2",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--force",
    ]
    subprocess.run(cmd, check=True)
    variables, provenance = checkpoints.load_variables(dst)
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    ours = models.create("resnet18", 2).apply(variables, x.transpose(0, 2, 3, 1))
    print(
        f"ported {provenance['source']} (sha256 {provenance['sha256'][:12]}...): "
        f"max |logit difference| vs torchvision = {np.abs(np.asarray(ours) - ref).max():.2e}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
