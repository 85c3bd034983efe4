"""Quickstart: a small classifier trained on 2 CPU ranks with DDP, with progress.

    python examples/quickstart.py            # 2 ranks (re-runs this script for rank 1)
    python examples/quickstart.py --devices 4 --epochs 5
"""
import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from notebook_fabric import Fabric


def make_dataset(n: int = 2048, features: int = 20, classes: int = 4) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, features, generator=generator) * 0.5
    targets = torch.randint(0, classes, (n,), generator=generator)
    inputs = centers[targets] + torch.randn(n, features, generator=generator) * 1.5
    return TensorDataset(inputs, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()

    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp", precision=args.precision)
    fabric.launch()
    fabric.seed_everything(42)

    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader = fabric.setup_dataloaders(DataLoader(make_dataset(), batch_size=64, shuffle=True))

    for epoch in range(args.epochs):
        total = torch.zeros((), device=fabric.device)
        batches = tqdm(train_loader, desc=f"epoch {epoch}", disable=not fabric.is_global_zero)
        for inputs, targets in batches:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            fabric.backward(loss)
            optimizer.step()
            total += loss.detach()
            batches.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # shown with the count, at its own pace
        mean_loss = fabric.all_reduce(total / len(train_loader), reduce_op="mean")
        fabric.print(f"epoch {epoch}: loss {mean_loss.item():.4f} on {fabric.world_size} ranks")
    fabric.save("quickstart.ckpt", {"model": model, "optimizer": optimizer, "epoch": args.epochs})
    fabric.print("saved quickstart.ckpt")


if __name__ == "__main__":
    main()
