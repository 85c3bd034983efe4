"""spec/002's migrated training loop ("AFTER"), shrunk to a tiny model and random data.

Run as in spec/002, with our command name and CPU ranks:
    notebook-fabric run --accelerator cpu --devices 4 tests/scripts/cli_spec_train.py
The script keeps the article's Fabric(accelerator="cuda", ...) line; the command line overrides it.
"""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from notebook_fabric import Fabric

torch.manual_seed(0)
train_dataset = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
MyModel = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))  # noqa: E731

# Configure strategy, accelerator, and precision here — not in the loop
fabric = Fabric(accelerator="cuda", devices=4, strategy="ddp", precision="bf16-mixed")
fabric.launch()
model = MyModel()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
train_loader = DataLoader(train_dataset, batch_size=8, shuffle=True)
# setup() wraps model in DDP, moves to device, sets up GradScaler
model, optimizer = fabric.setup(model, optimizer)
train_loader = fabric.setup_dataloaders(train_loader)
for epoch in range(2):
    for batch in train_loader:
        inputs, targets = batch  # already on correct device
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = nn.CrossEntropyLoss()(outputs, targets)
        fabric.backward(loss)  # replaces loss.backward() — handles scaler
        optimizer.step()
    mean_loss = fabric.all_reduce(loss.detach().float(), reduce_op="mean")
    if fabric.is_global_zero:
        print(f"SPEC epoch={epoch} world_size={fabric.world_size} batches={len(train_loader)} loss={mean_loss.item():.4f}", flush=True)
