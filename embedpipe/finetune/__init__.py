"""The fine-tune stage: rerun the full network on labelled images, at a learning rate 10-100x below from-scratch.

Its rooms: :mod:`.stage` (``fine_tune``: the data, the network and its head prepared, the summary),
:mod:`.recipe` (valid options, which layers train, layer-wise and head learning rates, the
schedule, the probe as the starting head), :mod:`.loop` (``Trainer``, the training loop: phases, epochs,
early stopping, checkpoints, resume) and :mod:`.rundir` (the run folder's files).
"""

from __future__ import annotations

from .loop import Outcome, Split, Splits, Trainer, train_transform
from .recipe import (LayerGroups, check_config, head_from_classifier, layer_groups, linear_from_probe, lr_factor, param_groups,
                     parse_unfreeze, plan_phases, set_lr, set_train_mode, set_trainable)
from .rundir import read_run
from .stage import FineTuneResult, fine_tune, prepare_network

__all__ = ["FineTuneResult", "LayerGroups", "Outcome", "Split", "Splits", "check_config", "fine_tune", "head_from_classifier",
           "layer_groups", "linear_from_probe", "lr_factor", "param_groups", "parse_unfreeze", "plan_phases", "prepare_network",
           "read_run", "set_lr", "set_train_mode", "set_trainable", "Trainer", "train_transform"]
