"""The demo patterns' calibration exchanges: one seed, used by the demo stores and the pruning evaluation alike."""

from __future__ import annotations

from demo.tasks import get_task
from server.patterns import CalibrationText

CALIBRATION_SEED = 7_000
"""Neither the training stream's seed nor the held-out evaluation's (`demo.evaluate.EVAL_SEED`)."""


def calibration_texts(task: str, n: int, seed: int = CALIBRATION_SEED) -> list[CalibrationText]:
    """`n` generated exchanges of `task`, each prompt with the answer the task expects."""
    return [CalibrationText(example.prompt, example.answer) for example in get_task(task).examples(n, seed)]
