"""spec/002's migration loop ("AFTER: same loop with Fabric") on 2 CPU ranks, with a model and data of its own.

The loop is the article's, line for line; only the accelerator (cpu), the device count (2), the
epoch count, the learning rate and the reporting lines (marked "ours") are ours.
"""

import copy

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from core_common import MyModel, classification_dataset, digest, emit
from notebook_fabric import Fabric

train_dataset = classification_dataset()
num_epochs = 4  # the article trains 10 epochs on a larger dataset

# Configure strategy, accelerator, and precision here — not in the loop
fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp",
                precision="bf16-mixed")
fabric.launch()
model = MyModel()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
train_loader = DataLoader(train_dataset, batch_size=32, shuffle=True)
# setup() wraps model in DDP, moves to device, sets up GradScaler
model, optimizer = fabric.setup(model, optimizer)
train_loader = fabric.setup_dataloaders(train_loader)
initial_state = copy.deepcopy(model.state_dict())  # ours: the plain-PyTorch loop below starts from the same weights
seen = []  # ours: which samples this rank trained on
for epoch in range(num_epochs):
    epoch_loss = torch.zeros(())  # ours: reporting
    for batch in train_loader:
        inputs, targets = batch  # already on correct device
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = nn.CrossEntropyLoss()(outputs, targets)
        fabric.backward(loss)  # replaces loss.backward() — handles scaler
        optimizer.step()
        epoch_loss += loss.detach()  # ours: reporting
        seen.append(len(inputs))
    mean_loss = fabric.all_reduce(epoch_loss / len(train_loader), reduce_op="mean")  # ours: reporting
    emit(fabric.global_rank, f"epoch{epoch}", loss=mean_loss.item())

emit(
    fabric.global_rank, "migration", epochs=num_epochs, output_dtype=str(outputs.dtype), params=digest(model.parameters()),
    param_dtype=str(next(model.parameters()).dtype), samples=sum(seen), world_size=fabric.world_size,
)

# ours: the same loop in plain PyTorch (DDP, a DistributedSampler, autocast), casting the inputs to
# bf16 and the outputs to float32 by hand: Lightning's bf16-mixed does exactly this, so must Fabric
plain = MyModel()
plain.load_state_dict(initial_state)
plain_ddp = DistributedDataParallel(plain)
plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
sampler = DistributedSampler(train_dataset, num_replicas=2, rank=fabric.global_rank, shuffle=True, seed=0)
plain_loader = DataLoader(train_dataset, batch_size=32, sampler=sampler)
for epoch in range(num_epochs):
    sampler.set_epoch(epoch)
    for inputs, targets in plain_loader:
        plain_optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = plain_ddp(inputs.to(torch.bfloat16))
        outputs = outputs.float()
        loss = nn.CrossEntropyLoss()(outputs, targets)
        loss.backward()
        plain_optimizer.step()
emit(fabric.global_rank, "migration_plain", params=digest(plain.parameters()))
