"""The three seed models: small example models written in plain PyTorch, as a tutorial writes them (pydlx's
examples and model benchmarks run them as written and after pydlx.optimize), their data, a small trainer, and the
interleaved timing of a training step and an inference batch that examples/train_seed_models.py reports.

Models (kept exactly as written, functional calls included): ``CNN`` (conv1 3->32, conv2 32->64, 3x3 pad 1, one
shared 2x2 ``pool``, fc1 64*6*6->128, fc2 128->10, ReLU via F.relu), ``RNN`` (nn.LSTM(input_size, hidden_size,
num_layers, batch_first=True), zero h0/c0, fc on the last step) and ``Autoencoder`` (784->400->200->32, mirrored
decoder, ReLU(True)). Data: scikit-learn's 8x8 digits (1797 images, shipped inside the package: no download),
resized as each model needs: 3x24x24 for the CNN (its fc1 expects 6x6 maps after two 2x2 pools), 28 rows of 28
pixels for the LSTM classifier, 28x28 = 784 pixels for the autoencoder.
"""
from __future__ import annotations

import time
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim


class CNN(nn.Module):
    def __init__(self):
        super(CNN, self).__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 6 * 6, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 64 * 6 * 6)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x


class RNN(nn.Module):
    def __init__(self, input_size, hidden_size, num_layers, num_classes):
        super(RNN, self).__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x):
        h0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size).to(x.device)
        c0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size).to(x.device)
        out, (hn, cn) = self.lstm(x, (h0, c0))
        out = self.fc(out[:, -1, :])
        return out


class Autoencoder(nn.Module):
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


# ------------------------------------------------------------------------------------------------ data
def _digits() -> Tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, torch.tensor(d.target, dtype=torch.int64)


def make_data(kind: str, device="cpu", dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Train/test tensors for ``kind`` in ("cnn", "rnn", "autoencoder"); a fixed 80/20 split."""
    imgs, labels = _digits()
    if kind == "cnn":
        x = F.interpolate(imgs, size=(24, 24), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    elif kind == "rnn":
        x = F.interpolate(imgs, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]  # 28 rows of 28
    elif kind == "autoencoder":
        x = F.interpolate(imgs, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, labels = x[perm].contiguous(), labels[perm]
    n = int(0.8 * x.shape[0])
    to = dict(device=device)
    return {"x_train": x[:n].to(dtype=dtype, **to), "y_train": labels[:n].to(**to),
            "x_test": x[n:].to(dtype=dtype, **to), "y_test": labels[n:].to(**to)}


def make_model(kind: str, small: bool = False) -> nn.Module:
    """The seed's model for ``kind`` (the seed's sizes; ``small``: a narrower LSTM for quick tests)."""
    if kind == "cnn":
        return CNN()
    if kind == "rnn":
        return RNN(input_size=28, hidden_size=32 if small else 256, num_layers=2, num_classes=10)
    if kind == "autoencoder":
        return Autoencoder(input_size=784, encoding_dim=32, n_layers=3)
    raise ValueError(f"unknown model kind {kind!r}")


def make_optimizer(kind: str, model: nn.Module):
    """The seed's optimizer for each model (SGD lr 0.001 momentum 0.9 for the CNN; Adam lr 0.001 otherwise)."""
    if kind == "cnn":
        return optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    return optim.Adam(model.parameters(), lr=0.001)


def loss_fn(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if kind == "autoencoder":
        return nn.MSELoss()(out.float(), x.float())
    return nn.CrossEntropyLoss()(out.float(), y)


def train(kind: str, model: nn.Module, data: Dict[str, torch.Tensor], epochs: int, batch: int,
          max_steps: int = 0, metrics: bool = True) -> Dict[str, object]:
    """Train with the seed's optimizer and loss; returns the loss of every step, the mean step time (ms) and (with
    ``metrics``) the test metrics (accuracy and macro F1 for the classifiers, reconstruction MSE for the
    autoencoder)."""
    opt = make_optimizer(kind, model)
    order = torch.Generator().manual_seed(1)
    losses: List[float] = []
    times: List[float] = []
    x, y = data["x_train"], data["y_train"]
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=order).to(x.device)
        for i in range(0, x.shape[0] - batch + 1, batch):
            idx = perm[i:i + batch]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(kind, model, x[idx], y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())  # syncs: the step time includes the GPU work
            times.append(time.perf_counter() - t0)
            if max_steps and len(losses) >= max_steps:
                break
        if max_steps and len(losses) >= max_steps:
            break
    return {"losses": losses, "step_ms": 1e3 * sum(times[1:]) / max(1, len(times) - 1),
            **(evaluate(kind, model, data) if metrics else {})}


def time_step_and_inference(kind: str, models: Dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                            rounds: int = 10, warmup: int = 2) -> Dict[Tuple[str, str], Tuple[float, float, float]]:
    """{(name, "step" or "inference"): (median, p20, p80) in ms} for each of ``models`` on the same batch ``x, y``:
    one training step (zero_grad, the seed's loss, backward, a step of the seed's optimizer: one optimizer per
    model, so the models' steps do not interfere) and one inference batch (no grad). All of them are timed
    interleaved in ``rounds`` rounds (pydlx.bench.measure), so that warm-up drift or a neighbour's load falls on
    every model alike rather than on whichever ran first. CPU: ``warmup`` calls of each first; CUDA: measure's
    warm-up and repetitions in milliseconds. Compare two entries with pydlx.bench.ratio / format_change."""
    from . import measure

    fns = {}
    for name, model in models.items():
        opt = make_optimizer(kind, model)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(kind, model, x, y).backward()
            opt.step()

        def infer(model=model):
            with torch.no_grad():
                model(x)

        fns[(name, "step")], fns[(name, "inference")] = step, infer
    if x.device.type == "cuda":
        return measure(fns, x.device, rounds=rounds)
    return measure(fns, x.device, warmup=warmup, rep=rounds)


@torch.no_grad()
def evaluate(kind: str, model: nn.Module, data: Dict[str, torch.Tensor]) -> Dict[str, float]:
    model.eval()
    out = model(data["x_test"]).float()
    model.train()
    if kind == "autoencoder":
        return {"recon_mse": F.mse_loss(out, data["x_test"].float()).item()}
    from sklearn.metrics import f1_score

    pred = out.argmax(1).cpu()
    truth = data["y_test"].cpu()
    return {"accuracy": (pred == truth).float().mean().item(),
            "f1": float(f1_score(truth.numpy(), pred.numpy(), average="macro"))}


def saved_bytes(run, exclude=()) -> int:
    """Bytes of the tensors autograd saves for backward while ``run()`` runs, each storage counted once, the storages
    of the tensors in ``exclude`` (a model's parameters) left out."""
    skip = {t.data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def saved_activation_bytes(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward + loss (parameters excluded; each storage
    counted once)."""
    x = x.clone()  # its own storage: a slice of the dataset would count the whole dataset
    return saved_bytes(lambda: loss_fn(kind, model, x, y), list(model.parameters()))
