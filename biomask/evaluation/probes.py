"""Probes on frozen embeddings: standardised features + the tuned logistic regression (linear), and
a small MLP trained with early stopping on the validation split (seeded, one thread)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import matthews_corrcoef
from sklearn.preprocessing import StandardScaler
from torch import nn


def standardised(x: np.ndarray, train: np.ndarray, others: list[np.ndarray]) -> list[np.ndarray]:
    """Features scaled with the training records' mean and sd (the probe must not see val/test)."""
    scaler = StandardScaler().fit(x[train])
    return [scaler.transform(x[idx]).astype(np.float32) for idx in (train, *others)]


def mlp_probe(
    x: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    seed: int,
    *,
    n_classes: int,
    hidden: int = 256,
    max_epochs: int = 200,
    patience: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> np.ndarray:
    """One hidden layer (GELU, dropout 0.1), AdamW. The epoch with the best validation MCC (the
    selection every method gets) predicts test; training stops when the validation loss has not
    improved for `patience` epochs (the loss, not MCC: MCC can stay flat while a fresh MLP still
    predicts the majority class, which would stop training before it starts)."""
    x_train, x_val, x_test = (torch.from_numpy(a) for a in standardised(x, train, [val, test]))
    y_train = torch.as_tensor(y[train], dtype=torch.int64)
    y_val = torch.as_tensor(y[val], dtype=torch.int64)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(x_train.shape[1], hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, n_classes)
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(seed)
        best_mcc, best_state = -np.inf, None
        best_loss, waited = np.inf, 0
        for _ in range(max_epochs):
            model.train()
            for index in torch.randperm(len(y_train), generator=generator).split(batch_size):
                loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                logits = model(x_val)
            val_loss = float(nn.functional.cross_entropy(logits, y_val)) if len(val) else 0.0
            mcc = matthews_corrcoef(y[val], logits.argmax(-1).numpy()) if len(val) else 0.0
            if mcc > best_mcc:
                best_mcc, best_state = mcc, {k: v.clone() for k, v in model.state_dict().items()}
            if val_loss < best_loss:
                best_loss, waited = val_loss, 0
            else:
                waited += 1
                if waited >= patience:
                    break
        model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            return model(x_test).argmax(-1).numpy()
