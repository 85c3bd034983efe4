"""spec/002's gradient accumulation + clipping loop on 2 CPU ranks (bf16-mixed), with a model and data of its own.

The loop is the article's; the accelerator (cpu), the device count (2), the model, data,
optimizer, epoch count and the reporting lines (marked) are ours.
"""

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from core_common import MyModel, classification_dataset, digest, emit
from notebook_fabric import Fabric

model = MyModel()
optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
train_loader = DataLoader(classification_dataset(), batch_size=8, shuffle=True)
criterion = nn.CrossEntropyLoss()
num_epochs = 3

fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp",
                precision="bf16-mixed")
fabric.launch()
model, optimizer = fabric.setup(model, optimizer)
train_loader = fabric.setup_dataloaders(train_loader)
accumulation_steps = 4  # effective batch = batch_size * 4 * num_gpus
max_grad_norm = 1.0
norms, optimizer_steps = [], 0  # ours: reporting
for epoch in range(num_epochs):
    optimizer.zero_grad()
    epoch_loss = torch.zeros(())  # ours: reporting
    for step, batch in enumerate(train_loader):
        inputs, targets = batch
        is_accumulating = (step + 1) % accumulation_steps != 0
        # no_backward_sync skips gradient all-reduce until the last accumulation step
        # This is the Fabric equivalent of DDP's no_sync() context manager
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            outputs = model(inputs)
            loss = criterion(outputs, targets) / accumulation_steps
            fabric.backward(loss)
        epoch_loss += loss.detach() * accumulation_steps  # ours: reporting
        if not is_accumulating:
            # Gradient clipping — Fabric handles unscaling for mixed precision
            norm = fabric.clip_gradients(model, optimizer, max_norm=max_grad_norm)
            norms.append(norm.item())  # ours: reporting
            optimizer.step()
            optimizer.zero_grad()
            optimizer_steps += 1  # ours: reporting
    mean_loss = fabric.all_reduce(epoch_loss / len(train_loader), reduce_op="mean")  # ours: reporting
    emit(fabric.global_rank, f"epoch{epoch}", loss=mean_loss.item())

emit(
    fabric.global_rank, "grad_accum", epochs=num_epochs, norms=norms, optimizer_steps=optimizer_steps,
    batches_per_epoch=len(train_loader), params=digest(model.parameters()), world_size=fabric.world_size,
)
