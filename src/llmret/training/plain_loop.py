"""A plain AdamW loop for the research probes in ``experiments/``: one process, one device, no
DeepSpeed, no checkpoints, no train log.

The workflow's stages train with :func:`llmret.training.loop.train` (DeepSpeed, resumable,
logged); a probe that runs a few dozen steps many times over would spend most of its time
starting that machinery. This loop keeps what decides how the first steps go, the stages'
learning-rate schedule (:func:`llmret.training.arguments.lr_factor`) and gradient-norm clipping,
and leaves out the rest. Nothing in the workflow uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from llmret.training.arguments import lr_factor


def plain_steps(
    params: Iterable[torch.nn.Parameter],
    steps: int,
    loss_at: Callable[[int], Mapping[str, Any]],
    lr: float,
    warmup_steps: int = 0,
    schedule: str = "constant",
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """``steps`` AdamW updates of ``params``, each on ``loss_at(step)["loss"]`` (``step`` counts
    from 1); yields ``(step, loss_at's output)`` after each update.

    The update of step ``s`` uses ``lr * lr_factor(s - 1, schedule, warmup_steps, steps)``: a
    linear warm-up from ``lr / warmup_steps`` (none with 0), then ``constant``, ``linear`` or
    ``cosine`` decay, as the stages' ``lr_scheduler``. ``weight_decay`` applies to every
    parameter (torch's AdamW default, 0.01; the stages spare biases and norms).
    ``max_grad_norm`` clips the gradients' global norm before each update (0: not clipped).
    Work happens as the caller iterates: stop iterating to stop training.
    """
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, schedule, warmup_steps, steps))
    for step in range(1, steps + 1):
        out = loss_at(step)
        opt.zero_grad()
        out["loss"].backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        yield step, out
