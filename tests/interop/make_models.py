"""Writes the TorchScript models the interop tests adapt: scripted and traced versions of one
small network with every adaptable kind (Conv2d, a grouped and a depthwise Conv2d, Conv1d,
Linear, Embedding, a free parameter), a random input, and the base model's output.

usage: make_models.py OUT_DIR"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gconv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)
        self.seq = nn.Conv1d(16, 16, 3, padding=1)
        self.emb = nn.Embedding(10, 16)
        self.register_buffer("ids", torch.tensor([1, 3, 5]))
        self.pos = nn.Parameter(torch.randn(16) * 0.1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.dw(x))
        x = self.gconv(x)
        x = self.seq(x.flatten(2)).mean(2)
        x = x + self.emb(self.ids).mean(0) + self.pos
        return self.fc(x)


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.jit.script(net).save(os.path.join(out, "scripted.pt"))
    torch.jit.trace(net, x).save(os.path.join(out, "traced.pt"))
    with torch.no_grad():
        y = net(x)
    st.save(os.path.join(out, "io.safetensors"), {"input": x, "base_output": y})


if __name__ == "__main__":
    main()
