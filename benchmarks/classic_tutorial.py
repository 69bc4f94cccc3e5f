"""The classic tutorial baseline, written plainly: torchvision Fashion-MNIST, ToTensor per
sample, DataLoader(batch_size=64, shuffle=True), LSTM 28->64 (one layer) + Linear, Adam lr 0.01,
one epoch, then test accuracy.

    python benchmarks/classic_tutorial.py --root TORCHVISION_ROOT [--json OUT.json]

ROOT must hold FashionMNIST/raw/ (benchmarks.loader.torchvision_root builds it; no download).
Prints `RESULT accuracy=<acc> seconds=<s>` the moment the test accuracy is known, so a parent
process can time it from launch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


class RNN(nn.Module):
    def __init__(self, input_size=28, hidden_size=64, num_layers=1, num_classes=10):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1, :])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--json")
    p.add_argument("--max-batches", type=int, default=None, help="stop the epoch early (smoke tests only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda: the same script on the GPU it is compared on")
    args = p.parse_args()
    device = torch.device(args.device)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train_dataset = datasets.FashionMNIST(args.root, train=True, transform=transforms.ToTensor(), download=False)
    test_dataset = datasets.FashionMNIST(args.root, train=False, transform=transforms.ToTensor(), download=False)
    train_loader = DataLoader(train_dataset, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_dataset, batch_size=64, shuffle=False)

    model = RNN().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    model.train()
    seen = 0
    loop_start = time.perf_counter()  # the training clock: first batch to test accuracy, as the trainer's time_s
    for i, (images, labels) in enumerate(train_loader):
        if args.max_batches is not None and i >= args.max_batches:
            break
        images, labels = images.reshape(-1, 28, 28).to(device), labels.to(device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(labels)
    train_s = time.perf_counter() - start

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in test_loader:
            pred = model(images.reshape(-1, 28, 28).to(device)).argmax(1).cpu()
            correct += (pred == labels).sum().item()
            total += len(labels)
    accuracy = correct / total
    seconds = time.perf_counter() - start
    training_seconds = time.perf_counter() - loop_start
    print(f"RESULT accuracy={accuracy:.6f} seconds={seconds:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"accuracy": accuracy, "seconds": seconds, "training_seconds": training_seconds,
                       "train_seconds": train_s, "train_samples": seen,
                       "train_samples_per_s": seen / train_s, "torch_threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
