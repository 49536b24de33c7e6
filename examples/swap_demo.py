"""Swap demo: pydlx.optimize() on the seed document's autoencoder, as the seed writes it.

Prints what optimize() fuses (pydlx.explain), checks that the state_dict is unchanged and that the optimized model
computes the same thing, then times a training step (MSE loss, Adam) of both on the available device.
Data: scikit-learn's 8x8 digits (shipped inside the package; no download), upscaled to the seed's 784 inputs.
"""
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import pydlx


class Autoencoder(nn.Module):  # the seed document's model, unchanged
    def __init__(self, input_size, encoding_dim, n_layers):
        super(Autoencoder, self).__init__()
        self.encoding_dim = encoding_dim
        self.n_layers = n_layers
        self.encoder = nn.Sequential(
            nn.Linear(input_size, 400),
            nn.ReLU(True),
            nn.Linear(400, 200),
            nn.ReLU(True),
            nn.Linear(200, encoding_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(encoding_dim, 200),
            nn.ReLU(True),
            nn.Linear(200, 400),
            nn.ReLU(True),
            nn.Linear(400, input_size)
        )

    def forward(self, x):
        x = self.encoder(x)
        x = self.decoder(x)
        return x


def digits_784(device, batch):
    """sklearn's digits (1797 images, 8x8), bilinearly upscaled to 28x28 = 784 features in [0, 1]."""
    from sklearn.datasets import load_digits

    imgs = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(imgs, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)
    reps = -(-batch // x.shape[0])
    return x.repeat(reps, 1)[:batch].to(device)


def time_step(model, x, steps):
    opt = optim.Adam(model.parameters(), lr=0.001)
    crit = nn.MSELoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = crit(model(x), x)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3, loss.item()


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = Autoencoder(input_size=784, encoding_dim=32, n_layers=3).to(device)
    print("pydlx.explain(net):")
    print("  " + pydlx.explain(net).replace("\n", "\n  "))
    fast = pydlx.optimize(net)
    before, after = net.state_dict(), fast.state_dict()
    same = list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    print(f"state_dict keys and values unchanged: {same}")
    x = digits_784(device, 256)
    with torch.no_grad():
        err = (fast(x) - net(x)).abs().max().item()
    print(f"max |optimized - original| on a batch of 256: {err:.2e}")
    steps = 20 if device.type == "cuda" else 5
    t_orig, l_orig = time_step(copy.deepcopy(net), x, steps)
    t_fast, l_fast = time_step(copy.deepcopy(fast), x, steps)
    print(f"training step, batch 256, {device}: original {t_orig:.3f} ms, optimized {t_fast:.3f} ms "
          f"({t_orig / t_fast:.2f}x); loss after {steps + 3} steps {l_orig:.5f} vs {l_fast:.5f}")
    if not same:
        raise SystemExit("state_dict changed")


if __name__ == "__main__":
    main()
