"""YOURS TO REPLACE: the model.

``build_model(cfg)`` returns an ``nn.Module`` mapping a batch of inputs to
logits. Anything works as long as the loss in ``task.py`` accepts its output.
{%- if cookiecutter.loop == "plain" %}

With parallel=fsdp, only rank 0 builds the model for real; the other ranks build
it on the meta device (no memory), then receive rank 0's weights and buffers. So
``build_model`` creates its parameters and buffers without naming a device and
never reads their values back (no ``.item()``, no file it loads weights from:
start from a checkpoint with ``init_from=`` instead); buffers it computes, such as
a rotary table, may be ordinary or ``persistent=False``: rank 0's are copied.
{%- endif %}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # for the annotations only: model.py and task.py load alone, as the exported weights' users do
    from .essentials.config import Config


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks: {% if cookiecutter.loop == "plain" %}with parallel=fsdp, the parts sharded (and gathered for compute) one at a
    time, the more the less memory a process holds at once; {% endif %}with activation_checkpointing=true, the parts
    whose activations are computed again in the backward. Here each child that has parameters; for a
    transformer, return its blocks (layers)."""
    return [child for child in model.children() if any(True for _ in child.parameters())]


# optimizer=muon: Muon updates every 2-D weight but the embeddings' and the output layer's (the last nn.Linear),
# AdamW the rest. If that split is wrong for your model (a 2-D weight Muon must not touch, or an output layer
# that is not the last Linear), define here hidden_matrices(model) -> list of the parameters Muon takes.


def build_model(cfg: Config) -> nn.Module:
    task = cfg.task  # this task's settings (task.py)
    return nn.Sequential(
        nn.Linear(task.input_dim, task.hidden_dim),
        nn.GELU(),
        nn.Dropout(task.dropout),
        nn.Linear(task.hidden_dim, task.hidden_dim),
        nn.GELU(),
        nn.Dropout(task.dropout),
        nn.Linear(task.hidden_dim, task.num_classes),
    )
