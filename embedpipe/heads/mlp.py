"""A small MLP head in torch, early-stopped on the validation loss.

One (or more) hidden ReLU layers with dropout on standardised embeddings,
trained with minibatch Adam(W) and cross-entropy; after every epoch the
validation loss decides whether the weights are the best so far, and training
stops ``patience`` epochs after the last improvement with the best weights
restored. The fitted network is a dict of plain numpy arrays (``weights_``).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from torch import nn

from ..errors import HeadError
from .base import Head, torch_device, stratified_split, torch_threads

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adam")
# Rows per forward pass at evaluation and prediction time: bounds activation memory
# (rows x hidden floats) without making small evaluations slower.
_EVAL_ROWS = 8192


def hidden_sizes(hidden: int | Sequence[int]) -> tuple[int, ...]:
    """Widths of the hidden layers: an int is one layer (0: none, a linear softmax head)."""
    sizes = (hidden,) if isinstance(hidden, (int, np.integer)) else tuple(hidden)
    if any(int(h) < 0 for h in sizes):
        raise HeadError(f"hidden={hidden!r} must be non-negative layer widths: try 512")
    return tuple(int(h) for h in sizes if int(h) > 0)


def build_network(n_in: int, hidden: Sequence[int], n_out: int, dropout: float) -> nn.Sequential:
    """``fc0 -> relu0 -> drop0 -> ... -> out``; parameter names are those of ``MLPHead.weights_``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = n_in
    for i, h in enumerate(hidden):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"drop{i}"] = nn.Dropout(dropout)
        width = h
    layers["out"] = nn.Linear(width, n_out)
    return nn.Sequential(layers)


class MLPHead(Head):
    """A small MLP on standardised embeddings, early-stopped on the validation loss.

    Args:
        hidden: width of the hidden layer, or a sequence of widths; 0 means no hidden layer.
        dropout: dropout after each hidden layer. 0.2: a mild guard, the embeddings are already good features.
        weight_decay: decoupled (AdamW) or L2 (Adam) weight decay.
        lr: learning rate. 1e-3: Adam's usual default, stable on standardised inputs.
        optimizer: ``"adamw"`` or ``"adam"``.
        batch_size: examples per step. 256: many steps per epoch on 10k-row sets, still full GPU batches.
        max_epochs: upper bound on epochs; early stopping usually ends sooner.
        patience: epochs without a lower validation loss before stopping. 10: the validation
            loss of a small head is noisy from one epoch to the next.
        class_weight: ``None``, ``"balanced"`` or a dict label -> weight, applied to the
            training and validation losses.
        val_fraction: share of each class held out for early stopping when ``X_val`` is
            not given. 0.1: it only estimates a loss, and the head is not refitted on it.
        random_state: seeds the split, the initial weights, the batch order and dropout;
            on CPU, equal seeds (and ``n_jobs``) give identical heads.
        device: ``"auto"`` (GPU when torch sees one), ``"cpu"``, ``"cuda"``, ...
        n_jobs: CPU threads for torch and BLAS (``None``: the cores other processes leave idle).

    Attributes:
        classes_: ``(n_classes,)`` the labels, sorted.
        n_features_in_: embedding width D.
        mean_, scale_: ``(D,)`` the input standardisation.
        weights_: dict parameter name -> float32 array (``fc0.weight`` ``(hidden, D)``,
            ``fc0.bias``, ..., ``out.weight`` ``(n_classes, width)``, ``out.bias``), at the best epoch.
        best_epoch_: index into ``history_`` of the epoch whose weights were kept.
        history_: one dict per epoch run: ``epoch``, ``train_loss``, ``val_loss``, ``val_acc``.
    """

    _state_arrays = ("mean_", "scale_")
    _state_values = ("best_epoch_", "history_")

    def __init__(
        self,
        hidden: int | Sequence[int] = 512,
        *,
        dropout: float = 0.2,
        weight_decay: float = 1e-4,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        batch_size: int = 256,
        max_epochs: int = 200,
        patience: int = 10,
        class_weight: None | str | dict[Any, float] = None,
        val_fraction: float = 0.1,
        random_state: int | None = 0,
        device: str = "auto",
        n_jobs: int | None = None,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.class_weight = class_weight
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.device = device
        self.n_jobs = n_jobs

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> MLPHead:
        """Train with early stopping on the validation loss; keep the best epoch's weights.

        Args:
            X: ``(n_samples, D)`` float embeddings.
            y: ``(n_samples,)`` labels of any sortable type.
            X_val, y_val: an explicit validation set, ``(n_val, D)`` and ``(n_val,)``; without
                them a stratified ``val_fraction`` of ``X`` is held out (2+ examples per class needed).

        Returns:
            self, fitted.
        """
        if self.optimizer not in OPTIMIZERS:
            raise HeadError(f"optimizer={self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise HeadError("max_epochs, patience and batch_size must be at least 1")
        hidden = hidden_sizes(self.hidden)
        X, y, X_val, y_val = self._check_fit_input(X, y, X_val, y_val)
        rng = check_random_state(self.random_state)
        if X_val is None:
            train, val = stratified_split(y, self.classes_, val_fraction=self.val_fraction, random_state=rng)
            X, y, X_val, y_val = X[train], y[train], X[val], y[val]
        scaler = StandardScaler().fit(X)
        self.mean_ = scaler.mean_.astype(np.float32)
        self.scale_ = scaler.scale_.astype(np.float32)
        weights = self._class_weights(y)
        device = torch_device(self.device)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        with torch_threads(self.n_jobs), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            net = build_network(X.shape[1], hidden, len(self.classes_), self.dropout).to(device)
            state = self._train(net, X, y, X_val, y_val, weights, device)
        self.weights_ = {name: value.cpu().numpy() for name, value in state.items()}
        return self

    def _train(
        self,
        net: nn.Sequential,
        X: np.ndarray,
        y: np.ndarray,
        X_val: np.ndarray,
        y_val: np.ndarray,
        class_weights: np.ndarray | None,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """The epoch loop; fills ``history_`` and ``best_epoch_``, returns the best state dict."""
        Xt, yt = self._tensor(X, device), torch.as_tensor(y, device=device)
        Xv, yv = self._tensor(X_val, device), torch.as_tensor(y_val, device=device)
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32, device=device)
        optimizer_class = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_class(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        n = len(Xt)
        self.history_: list[dict[str, float]] = []
        best_loss, best_state = float("inf"), None
        for epoch in range(self.max_epochs):
            net.train()
            total = torch.zeros((), device=device)
            for batch in torch.randperm(n, device=device).split(self.batch_size):
                loss = F.cross_entropy(net(Xt[batch]), yt[batch], weight=weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(batch)
            val_loss, val_acc = _evaluate(net, Xv, yv, weight)
            if not math.isfinite(val_loss):
                raise HeadError(
                    f"the MLP's validation loss became {val_loss} at epoch {epoch}: lower lr (now {self.lr})"
                )
            self.history_.append(
                {"epoch": epoch, "train_loss": float(total) / n, "val_loss": val_loss, "val_acc": val_acc}
            )
            if val_loss < best_loss:
                best_loss, self.best_epoch_ = val_loss, epoch
                best_state = {name: value.detach().clone() for name, value in net.state_dict().items()}
            elif epoch - self.best_epoch_ >= self.patience:
                break
        logger.debug(
            "MLP: %d epochs, best %d (val loss %.4f)", len(self.history_), self.best_epoch_, best_loss
        )
        return best_state  # type: ignore[return-value]  # set at epoch 0: a finite loss beats inf

    def _tensor(self, X: np.ndarray, device: torch.device) -> torch.Tensor:
        """``X`` ``(n, D)`` standardised, as float32 on ``device``."""
        Z = (np.asarray(X, dtype=np.float32) - self.mean_) / self.scale_
        return torch.as_tensor(Z, device=device)

    def _network(self, device: torch.device) -> nn.Sequential:
        """The fitted network rebuilt from ``weights_``, in eval mode."""
        hidden = [self.weights_[f"fc{i}.weight"].shape[0] for i in range(len(self.weights_) // 2 - 1)]
        net = build_network(self.n_features_in_, hidden, len(self.classes_), 0.0)
        net.load_state_dict({name: torch.from_numpy(np.asarray(v)) for name, v in self.weights_.items()})
        return net.to(device).eval()

    def _proba(self, X: np.ndarray) -> np.ndarray:
        device = torch_device(self.device)
        with torch_threads(self.n_jobs), torch.inference_mode():
            net = self._network(device)
            Xt = self._tensor(X, device)
            proba = [torch.softmax(net(chunk), dim=1).cpu() for chunk in Xt.split(_EVAL_ROWS)]
        return torch.cat(proba).numpy() if proba else np.zeros((0, len(self.classes_)), dtype=np.float32)

    def _check_state(self) -> None:
        width = self.n_features_in_
        self._expect_array("mean_", (width,))
        if not self._expect_array("scale_", (width,)).all():
            raise HeadError("head state's 'scale' array has zeros, which would divide by zero: refit the head")
        weights = getattr(self, "weights_", None)
        layers = len(weights) // 2 - 1 if isinstance(weights, dict) else -1
        names = [f"fc{i}.{part}" for i in range(layers) for part in ("weight", "bias")] + ["out.weight", "out.bias"]
        if layers < 0 or sorted(weights) != sorted(names):
            raise HeadError(f"head state's MLP weights are {sorted(weights or {})}, not fc0..fcN and out layers: refit the head")
        for layer in [f"fc{i}" for i in range(layers)] + ["out"]:
            weight, bias = weights[f"{layer}.weight"], weights[f"{layer}.bias"]
            rows = len(self.classes_) if layer == "out" else (weight.shape[0] if weight.ndim == 2 and weight.shape[0] else -1)
            for name, array, expected in ((f"{layer}.weight", weight, (rows, width)), (f"{layer}.bias", bias, (rows,))):
                if not isinstance(array, np.ndarray) or array.dtype.kind != "f" or array.shape != expected:
                    raise HeadError(f"head state's weights.{name} is not a float array of shape {expected}: refit the head")
                if not np.isfinite(array).all():
                    raise HeadError(f"head state's weights.{name} holds NaN or infinite values: refit the head")
            width = rows

    def _state_extra_arrays(self) -> dict[str, np.ndarray]:
        return {f"weights.{name}": np.ascontiguousarray(value) for name, value in self.weights_.items()}

    def _restore_extra_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights_ = {
            name.removeprefix("weights."): np.asarray(value)
            for name, value in arrays.items()
            if name.startswith("weights.")
        }


@torch.no_grad()
def _evaluate(
    net: nn.Module, X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None
) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``net`` in eval mode on ``X`` ``(n, D)``, ``y`` ``(n,)``; loss weighted as in training."""
    net.eval()
    logits = torch.cat([net(chunk) for chunk in X.split(_EVAL_ROWS)])
    loss = F.cross_entropy(logits, y, weight=weight)
    accuracy = (logits.argmax(dim=1) == y).float().mean()
    return float(loss), float(accuracy)
