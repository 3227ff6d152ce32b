"""share_jax.diagnostics against float64 NumPy references on dense ΔW, and the plots it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lora_adapters import KERNELS, kernel_zeros, random_lora

import share_jax as sj
from share_jax import diagnostics as dg


def dense_delta(lora: sj.LoRA) -> np.ndarray:
  return np.asarray(lora.a, np.float64) @ np.asarray(lora.b, np.float64) * lora.scale


def cka_ref(x: np.ndarray, y: np.ndarray) -> float:
  """Linear CKA (Kornblith et al.) of two (n, p) representations, rows = examples."""
  x, y = x - x.mean(0), y - y.mean(0)
  return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def principal_cos2_ref(x: np.ndarray, y: np.ndarray) -> float:
  """Mean squared cosine of the principal angles between span(x) and span(y), via scipy-free
  QR + SVD of QxᵀQy."""
  qx, _ = np.linalg.qr(x)
  qy, _ = np.linalg.qr(y)
  cos = np.linalg.svd(qx.T @ qy, compute_uv=False)
  return float(np.mean(cos[: min(x.shape[1], y.shape[1])] ** 2))


def loras(seed: int, n: int = 3) -> list:
  rng = np.random.default_rng(seed)
  return [random_lora(rng) for _ in range(n)]


def test_explained_variance_matches_svd_of_the_centred_stack():
  trees = loras(0)
  curves = dg.explained_variance(trees)
  assert set(curves) == {(p, s) for p in KERNELS for s in "ab"}
  for (path, side), curve in curves.items():
    leaves = [sj.lora_leaves(t)[path] for t in trees]
    cols = [
      np.asarray(x.a, np.float64) if side == "a" else (np.asarray(x.b, np.float64) * x.scale).T
      for x in leaves
    ]
    stack = np.concatenate(cols, axis=1)
    stack = stack - stack.mean(axis=1, keepdims=True)
    lam = np.linalg.svd(stack, compute_uv=False) ** 2
    np.testing.assert_allclose(curve, np.cumsum(lam) / lam.sum(), rtol=1e-10, atol=1e-12)
    assert curve[-1] == pytest.approx(1.0)
  ks = dg.k_for(curves, 0.9)
  assert all(1 <= k <= len(curves[s]) for s, k in ks.items())


def test_explained_variance_of_a_subspace_reaches_one_at_its_k():
  """Stored tasks live in the bases: their curve reaches 1 at the active k of each side."""
  sub = sj.init_subspace(kernel_zeros(), loras(1, 4), k=3, center=False)
  curves = dg.explained_variance(sub)
  for slot, k in sub.ranks().items():
    assert curves[slot][k - 1] == pytest.approx(1.0, abs=1e-6)
    assert curves[slot][k - 2] < 1 - 1e-4


def test_cka_similarity_matches_dense_reference():
  trees = loras(2, 4)
  ids, sim = dg.task_similarity({f"t{i}": t for i, t in enumerate(trees)}, "cka")
  assert ids == ["t0", "t1", "t2", "t3"]
  for i in range(4):
    for j in range(4):
      li, lj = sj.lora_leaves(trees[i]), sj.lora_leaves(trees[j])
      want = np.mean([cka_ref(dense_delta(li[p]), dense_delta(lj[p])) for p in KERNELS])
      assert sim[i, j] == pytest.approx(want, rel=1e-9)
  np.testing.assert_allclose(np.diag(sim), 1.0, rtol=1e-12)


def test_angle_similarity_matches_dense_reference_and_sees_a_shared_span():
  rng = np.random.default_rng(3)
  trees = loras(4, 2)
  # a third task inside the first task's spans (new mixing of the same columns)
  mix = rng.normal(size=(4, 4))
  shared = {}
  for path, x in sj.lora_leaves(trees[0]).items():
    r = x.rank
    shared[path] = sj.LoRA(np.asarray(x.a) @ mix[:r, :r], mix[:r, :r].T @ np.asarray(x.b), x.alpha)
  trees.append(sj.paths.nest(shared))
  _, sim = dg.task_similarity(trees, "angles")
  for i in range(3):
    for j in range(3):
      li, lj = sj.lora_leaves(trees[i]), sj.lora_leaves(trees[j])
      want = []
      for p in KERNELS:
        for side in ("a", "b"):
          x, y = (np.asarray(getattr(lv[p], side), np.float64) for lv in (li, lj))
          want.append(principal_cos2_ref(x, y) if side == "a" else principal_cos2_ref(x.T, y.T))
      assert sim[i, j] == pytest.approx(np.mean(want), rel=1e-9)
  assert sim[0, 2] == pytest.approx(1.0) and sim[0, 1] < 0.5


def test_novelty_matches_dense_projection_and_is_zero_for_stored_tasks():
  trees = loras(5, 3)
  sub = sj.init_subspace(kernel_zeros(), trees[:2], k=6, center=False)
  assert dg.novelty(sub, sj.reconstruct(sub, 0)).total == pytest.approx(0.0, abs=1e-6)
  new = trees[2]
  got = dg.novelty(sub, new)
  from numpy_reference import active_basis

  lost = energy = 0.0
  for path, x in sj.lora_leaves(new).items():
    ua, ub = active_basis(sub, path, "a"), active_basis(sub, path, "b")
    dw = dense_delta(x)
    kept = ua @ ua.T @ dw @ ub @ ub.T
    want = np.linalg.norm(dw - kept) ** 2 / np.linalg.norm(dw) ** 2
    assert got.kernels[path] == pytest.approx(want, rel=1e-5, abs=1e-7)
    a = np.asarray(x.a, np.float64)
    side_a = np.linalg.norm(a - ua @ ua.T @ a) ** 2 / np.linalg.norm(a) ** 2
    assert got.sides[(path, "a")] == pytest.approx(side_a, rel=1e-5, abs=1e-7)
    lost += np.linalg.norm(dw - kept) ** 2
    energy += np.linalg.norm(dw) ** 2
  assert got.total == pytest.approx(lost / energy, rel=1e-5)
  assert 0.0 < got.total < 1.0


def test_bad_inputs_are_clear_errors():
  trees = loras(6, 2)
  with pytest.raises(sj.ShareError, match="unknown similarity measure 'cos'"):
    dg.task_similarity(trees, "cos")
  partial = {p: x for p, x in sj.lora_leaves(trees[1]).items() if "layer_0" in p}
  with pytest.raises(sj.ShareError, match="task 1 adapts kernels"):
    dg.explained_variance([trees[0], sj.paths.nest(partial)])
  sub = sj.init_subspace(kernel_zeros(), trees, k=2)
  with pytest.raises(sj.ShareError, match="the adapter's kernels differ"):
    dg.novelty(sub, sj.paths.nest(partial))


def test_write_report_writes_pngs_and_numbers(tmp_path):
  pytest.importorskip("matplotlib")
  sub = sj.init_subspace(kernel_zeros(), loras(7, 3), k=4, task_ids=["x", "y", "z"])
  numbers = dg.write_report(sub, tmp_path)
  for name in ("explained_variance", "similarity_cka", "similarity_angles"):
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
  saved = json.loads((tmp_path / "diagnostics.json").read_text())
  assert saved == json.loads(json.dumps(numbers))
  assert saved["tasks"] == ["x", "y", "z"]
  assert np.asarray(saved["similarity_cka"]).shape == (3, 3)


def test_cli_info_plot_writes_pngs_and_prints_numbers(tmp_path, capsys):
  pytest.importorskip("matplotlib")
  from lora_adapters import write_random_adapter

  from share_jax.cli import main

  rng = np.random.default_rng(8)
  for name in ("sst2", "mnli", "rte"):
    write_random_adapter(tmp_path / name, rng)
  ckpt, plots = tmp_path / "ckpt", tmp_path / "plots"
  dirs = [str(tmp_path / n) for n in ("sst2", "mnli", "rte")]
  assert main(["init", *dirs, "--out", str(ckpt), "--k", "3", "--scheme", "share_bert"]) == 0
  capsys.readouterr()
  assert main(["info", str(ckpt), "--plot", str(plots)]) == 0
  out = capsys.readouterr().out
  assert "k to keep 90% of the factor energy" in out and "task similarity (cka)" in out
  assert (plots / "similarity_angles.png").stat().st_size > 1000
  saved = json.loads((plots / "diagnostics.json").read_text())
  assert saved["tasks"] == ["sst2", "mnli", "rte"]
  assert main(["info", str(ckpt), "--json", "--plot", str(plots)]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["diagnostics"]["similarity_cka"] == saved["similarity_cka"]
