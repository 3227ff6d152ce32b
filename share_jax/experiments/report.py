"""``results.json`` entries and the printed comparison table."""

from __future__ import annotations

import numpy as np

from share_jax.experiments import metrics
from share_jax.experiments.methods import Method
from share_jax.storage import FLOAT_BYTES


def matrix_json(r: np.ndarray) -> list[list[float | None]]:
  """NaN → None, values rounded to 0.01."""
  return [[None if np.isnan(v) else round(float(v), 2) for v in row] for row in r]


def method_result(
  method: Method, r: np.ndarray, wall_s: float, cpu_s: float, reference: np.ndarray | None
) -> dict:
  """One method's entry; accuracies in percent, ``bytes`` as float32; ``cpu_s`` is process CPU
  time (all cores), the better measure on a machine shared with other jobs."""
  cost = method.cost
  trained = np.add(cost.adapter_trained, cost.head)
  stored = np.add(cost.adapter_stored, cost.head)
  return {
    "acc_matrix": matrix_json(r),
    **{k: None if v is None else round(v, 2) for k, v in metrics.summary(r, reference).items()},
    "trainable_params_per_task": float(np.mean(trained)),
    "bytes_per_task": float(np.mean(stored)) * FLOAT_BYTES,
    "shared_bytes": cost.shared * FLOAT_BYTES,
    "params": {
      "adapter_trained_per_task": list(cost.adapter_trained),
      "adapter_stored_per_task": list(cost.adapter_stored),
      "head_per_task": list(cost.head),
      "shared": cost.shared,
    },
    "wall_s": round(wall_s, 1),
    "cpu_s": round(cpu_s, 1),
    "strict": method.strict,
  }


def _fmt(v, spec: str) -> str:
  return "-" if v is None else format(v, spec)


def table(results: dict[str, dict]) -> str:
  """The comparison table (accuracies in points, parameters per task excluding heads)."""
  head = (
    f"{'method':<16}{'strict':>7}{'ACC':>7}{'BWT':>7}{'forget':>7}{'FWT':>7}"
    f"{'trained/task':>14}{'stored/task':>13}{'bytes/task':>12}{'shared B':>11}{'wall s':>8}"
    f"{'CPU s':>7}"
  )
  lines = [head, "-" * len(head)]
  for name, r in results.items():
    p = r["params"]
    lines.append(
      f"{name:<16}{'yes' if r['strict'] else 'no':>7}{_fmt(r['ACC'], '.1f'):>7}"
      f"{_fmt(r['BWT'], '.1f'):>7}{_fmt(r['forgetting'], '.1f'):>7}{_fmt(r['FWT'], '.1f'):>7}"
      f"{np.mean(p['adapter_trained_per_task']):>14,.0f}{np.mean(p['adapter_stored_per_task']):>13,.0f}"
      f"{r['bytes_per_task']:>12,.0f}{r['shared_bytes']:>11,.0f}{r['wall_s']:>8.0f}"
      f"{r['cpu_s']:>7.0f}"
    )
  lines.append(
    "trained/stored/task: adapter parameters (heads excluded); bytes/task: float32 stored per task "
    "(adapter + head); shared B: bytes shared by all tasks (Share bases, the single LoRA)."
  )
  return "\n".join(lines)


def parameter_ratios(results: dict[str, dict]) -> str | None:
  """Share's adapter parameters per task as a percentage of per-task LoRA's."""
  if "lora_per_task" not in results:
    return None
  lora = np.mean(results["lora_per_task"]["params"]["adapter_trained_per_task"])
  out = []
  for name in ("share", "share_full"):
    if name in results:
      p = results[name]["params"]
      trained = np.mean(p["adapter_trained_per_task"])
      stored = np.mean(p["adapter_stored_per_task"])
      later = np.mean(p["adapter_trained_per_task"][1:] or [0])
      out.append(
        f"{name}: adapter params per task vs LoRA: stored {100 * stored / lora:.2f} %, "
        f"trained {100 * trained / lora:.2f} % (coefficients + temporary factors; "
        f"tasks after the first {100 * later / lora:.2f} %)"
      )
  return "\n".join(out) or None
