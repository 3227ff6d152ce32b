"""apply_lora: W + a b · scale on the adapted kernels, by joined path; everything else untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import share_jax as sj
from share_jax.lora import apply_lora


def params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  w = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
  return {"enc": {"q": {"kernel": w(6, 4), "bias": w(4)}, "k": {"kernel": w(6, 4)}}}


def test_adds_the_scaled_product_on_target_paths_only():
  p = params()
  lora = sj.init_lora_tree(p, r"q/kernel$", rank=2, rng=jax.random.key(0), alpha=4.0)
  lora = jax.tree.map(lambda x: x + 0.5, lora)  # b is zero at init; make ΔW non-zero
  (leaf,) = sj.lora_leaves(lora).values()
  out = apply_lora(p, lora)
  np.testing.assert_allclose(
    out["enc"]["q"]["kernel"], p["enc"]["q"]["kernel"] + leaf.a @ leaf.b * 2.0, rtol=1e-6
  )
  assert out["enc"]["k"]["kernel"] is p["enc"]["k"]["kernel"]
  assert out["enc"]["q"]["bias"] is p["enc"]["q"]["bias"]


def test_keeps_the_parameter_dtype_and_is_differentiable():
  p = params(jnp.bfloat16)
  lora = sj.init_lora_tree(p, r"kernel$", rank=1, rng=jax.random.key(1))
  assert apply_lora(p, lora)["enc"]["q"]["kernel"].dtype == jnp.bfloat16
  grads = jax.grad(lambda lo: jnp.sum(apply_lora(p, lo)["enc"]["k"]["kernel"].astype(float)))(lora)
  assert float(jnp.abs(grads["enc"]["k"]["kernel"].b).sum()) > 0


def test_float64_kernels_are_updated_in_float64():
  """No round trip through float32: W + ΔW equals the float64 NumPy sum (here ΔW ~ 1e-9·W)."""
  with jax.enable_x64(True):
    p = params(jnp.float64)
    a, b = np.full((4, 1), 1e-5), np.full((1, 6), 1e-4)
    lora = {"enc": {"k": {"kernel": sj.LoRA(jnp.asarray(a), jnp.asarray(b), transposed=True)}}}
    out = apply_lora(p, lora)["enc"]["k"]["kernel"]
    assert out.dtype == jnp.float64
    want = np.asarray(p["enc"]["k"]["kernel"]) + (a @ b).T
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-15, atol=0)


def test_a_lora_for_a_kernel_the_params_lack_is_an_error():
  lora = {"enc": {"v": {"kernel": sj.LoRA(jnp.zeros((6, 1)), jnp.zeros((1, 4)))}}}
  with pytest.raises(sj.ShareError, match="enc/v/kernel"):
    apply_lora(params(), lora)
  bad = {"enc": {"q": {"kernel": sj.LoRA(jnp.zeros((5, 1)), jnp.zeros((1, 4)))}}}
  with pytest.raises(sj.ShareError, match="enc/q/kernel"):
    apply_lora(params(), bad)
