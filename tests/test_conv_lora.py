"""Share on kernels of any rank and layout: convolution kernels (kh, kw, c_in, c_out) adapted as
(kh·kw·c_in, c_out) matrices, and kernels stored (out, in) (GPT-2's Conv1D, PEFT's
fan_in_fan_out): float64 references, training, serving, and PEFT import/export against torch."""

from __future__ import annotations

import copy
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import share_jax as sj
from share_jax.lora import LoRA, is_lora, lora_leaves
from share_jax.paths import flatten_with_paths, nest
from share_jax.peft_io import export_task, read_adapter
from share_jax.serving import mixed_task_apply, task_indices

needs_peft = pytest.mark.skipif(
  any(importlib.util.find_spec(m) is None for m in ("torch", "peft", "transformers")),
  reason="needs torch, peft and transformers",
)


class ConvNet(nn.Module):
  """A 3×3 conv, a 1×1 conv, mean pool, a dense layer; names match the torch twin below."""

  groups: int = 1

  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(nn.Conv(8, (3, 3), padding=1, name="c1")(x))
    x = jax.nn.relu(nn.Conv(8, (1, 1), feature_group_count=self.groups, name="c2")(x))
    return nn.Dense(4, name="fc")(x.mean(axis=(1, 2)))


def conv_params(seed=0):
  x = jnp.zeros((1, 6, 6, 3))
  return ConvNet().init(jax.random.key(seed), x)


def random_conv_lora(params, rank, seed) -> dict:
  rng = np.random.default_rng(seed)
  leaves = {}
  for path, w in flatten_with_paths(params).items():
    if path.endswith("kernel"):
      d_in, d_out = int(np.prod(w.shape[:-1])), w.shape[-1]
      a = rng.normal(size=(d_in, rank)).astype(np.float32)
      b = rng.normal(size=(rank, d_out)).astype(np.float32) / 4
      leaves[path] = LoRA(jnp.asarray(a), jnp.asarray(b))
  return nest(leaves)


def ref_task_params(params, lora) -> dict:
  """float64: W + reshape(a @ b) on every adapted kernel."""
  out = {p: np.asarray(w, np.float64) for p, w in flatten_with_paths(params).items()}
  for p, x in flatten_with_paths(lora, is_leaf=is_lora).items():
    delta = np.asarray(x.a, np.float64) @ np.asarray(x.b, np.float64)
    out[p] = out[p] + (delta.T if x.transposed else delta.reshape(out[p].shape))
  return out


def test_conv_kernels_adapt_as_matrices_float64_reference():
  params = conv_params()
  loras = [random_conv_lora(params, 2, s) for s in range(3)]
  sub = sj.init_subspace(params, loras, k=6, center=False)
  spec = sub.layout.spec("params/c1/kernel")
  assert (spec.shape, spec.stored_shape) == ((27, 8), (3, 3, 3, 8))
  for t, lora in enumerate(loras):  # k = 6 = total rank: lossless
    got = flatten_with_paths(sj.task_params(params, sub, t))
    for p, want in ref_task_params(params, lora).items():
      np.testing.assert_allclose(np.asarray(got[p], np.float64), want, rtol=1e-4, atol=1e-4)
    applied = flatten_with_paths(sj.apply_lora(params, lora))
    np.testing.assert_allclose(applied["params/c1/kernel"], got["params/c1/kernel"], atol=1e-4)
  rebuilt = sj.lora_leaves(sj.reconstruct(sub, 1))["params/c1/kernel"]
  assert rebuilt.a.shape[0] == 27 and not rebuilt.transposed


def test_conv_lora_is_the_two_convolutions_of_peft():
  """W + ΔW in one conv equals conv(x, W) + conv1x1(conv(x, A as a window), B), in float64."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 3, 4, 5))
  a, b = rng.normal(size=(36, 2)), rng.normal(size=(2, 5))
  x = rng.normal(size=(2, 7, 7, 4))
  out = jax.jit(lambda v, x: nn.Conv(5, (3, 3), use_bias=False).apply(v, x))
  merged = sj.apply_lora({"params": {"kernel": w}}, {"params": {"kernel": LoRA(a, b)}})
  got = np.asarray(out(jax.tree.map(jnp.float32, merged), jnp.float32(x)))

  def tconv(x, k):  # NHWC x, (kh, kw, in, out) kernel, SAME
    return torch.nn.functional.conv2d(
      torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(k).permute(3, 2, 0, 1), padding=1
    )

  z = tconv(x, a.reshape(3, 3, 4, 2))
  lora = torch.einsum("bphw,po->bohw", z, torch.from_numpy(b))
  want = (tconv(x, w) + lora).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_selecting_conv_kernels_and_errors():
  params = conv_params()
  sub = sj.empty_subspace(params, r"c[12]/kernel$")
  assert [s.stored_shape for s in sub.layout.kernels] == [(3, 3, 3, 8), (1, 1, 8, 8)]
  bad = {"params/c1/kernel": jnp.zeros((3, 8))}
  with pytest.raises(sj.ShareError, match=r"ΔW for 'params/c1/kernel' is \(3, 8\)"):
    sj.lora.add_deltas(params, bad)
  wrong = {"params": {"c1": {"kernel": LoRA(jnp.ones((9, 1)), jnp.ones((1, 8)))}}}
  with pytest.raises(sj.ShareError, match="maps 9 -> 8 but the kernel is"):
    sj.init_subspace(params, [wrong])


def test_training_and_serving_conv_kernels():
  params = conv_params()
  model = ConvNet()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6, 6, 3)), jnp.float32)
  y = jnp.asarray([0, 1, 2, 3])
  sub = sj.empty_subspace(params, r"(c1|c2|fc)/kernel$", k=8, center=False)  # lossless merges

  def loss(p, head, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, batch[0]), batch[1]
    ).mean()

  opt = optax.adam(1e-2)
  step = sj.make_train_step(loss, opt, sub.layout)
  for t in range(2):
    state = sj.begin_task(sub, t, rng=jax.random.key(t), p=2, phi=2)
    opt_state = opt.init(state)
    first = None
    for _ in range(5):
      state, opt_state, value = step(state, opt_state, params, sub.bases, (x, (y + t) % 4))
      first = value if first is None else first
    assert float(value) < float(first)
    trained = model.apply(sj.adapted_params(params, sub, state), x)
    sub = sj.finish_task(sub, state, t)
    merged = model.apply(sj.task_params(params, sub, t), x)  # lossless: k holds all columns
    np.testing.assert_allclose(merged, trained, rtol=1e-4, atol=1e-4)
  tasks = task_indices(sub, [0, 1, 1, 0])
  mixed = mixed_task_apply(model.apply, params, sub, tasks, x)
  for i, t in enumerate([0, 1, 1, 0]):
    alone = model.apply(sj.task_params(params, sub, t), x[i : i + 1])
    np.testing.assert_allclose(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_depthwise_conv_cannot_be_served_factored():
  model = ConvNet(groups=8)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
  sub = sj.init_subspace(params, [random_conv_lora(params, 1, 0)], k=1)
  with pytest.raises(sj.ShareError, match="feature_group_count=8.*task_params"):
    mixed_task_apply(model.apply, params, sub, task_indices(sub, [0]), jnp.zeros((1, 6, 6, 3)))


# ----------------------------------------------------------------------------- torch peft


def torch_convnet(params):
  """The torch twin of ``ConvNet`` holding the same weights."""
  import torch

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
      self.c2 = torch.nn.Conv2d(8, 8, 1)
      self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
      x = torch.relu(self.c2(torch.relu(self.c1(x))))
      return self.fc(x.mean(dim=(2, 3)))

  net = Net()
  p = params["params"]
  with torch.no_grad():
    for name in ("c1", "c2"):
      getattr(net, name).weight.copy_(
        torch.from_numpy(np.array(p[name]["kernel"])).permute(3, 2, 0, 1)
      )
      getattr(net, name).bias.copy_(torch.from_numpy(np.array(p[name]["bias"])))
    net.fc.weight.copy_(torch.from_numpy(np.array(p["fc"]["kernel"]).T))
    net.fc.bias.copy_(torch.from_numpy(np.array(p["fc"]["bias"])))
  return net


def peft_wrap(model, directory, seed, **config):
  import torch
  from peft import LoraConfig, get_peft_model

  peft_model = get_peft_model(model, LoraConfig(**config))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.normal_(std=0.3)
  peft_model.save_pretrained(directory)
  return peft_model.eval()


@needs_peft
def test_conv2d_lora_import_and_export_match_peft(tmp_path):
  import torch
  from peft import PeftModel

  params = conv_params()
  x = np.random.default_rng(2).normal(size=(2, 6, 6, 3)).astype(np.float32)
  tx = torch.from_numpy(x).permute(0, 3, 1, 2)
  adapters, outputs = [], []
  for seed in range(2):
    cfg = dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "fc"])
    peft_model = peft_wrap(torch_convnet(params), tmp_path / f"in{seed}", seed, **cfg)
    with torch.no_grad():
      outputs.append(peft_model(tx).numpy())
    adapters.append(read_adapter(tmp_path / f"in{seed}", params=params["params"]))
    assert adapters[-1].shapes["c1/kernel"] == (3, 3, 3, 8)
  p = params["params"]

  def run(q):
    return np.asarray(ConvNet().apply({"params": q}, x))

  for adapter, want in zip(adapters, outputs, strict=True):
    np.testing.assert_allclose(run(sj.apply_lora(p, adapter.lora)), want, rtol=1e-5, atol=1e-5)
  sub = sj.init_subspace(p, [a.lora for a in adapters], k=4, center=False)  # rank 4: lossless
  for t, want in enumerate(outputs):
    np.testing.assert_allclose(run(sj.task_params(p, sub, t)), want, rtol=1e-5, atol=1e-5)
    export_task(sub, t, tmp_path / f"out{t}", meta=adapters[t].task_meta())
    back = PeftModel.from_pretrained(torch_convnet(params), tmp_path / f"out{t}").eval()
    with torch.no_grad():
      np.testing.assert_allclose(back(tx).numpy(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GPT-2 Conv1D


def gpt2_flax_params(model) -> dict:
  """HF FlaxGPT2LMHeadModel parameters from a torch GPT2LMHeadModel, laid out as transformers'
  converter does (Conv1D weights (in, out) become kernels stored (out, in); the LM head is tied to
  wte), without the Flax model's random init."""
  out = {}
  for name, w in model.state_dict().items():
    *module, leaf = name.split(".")
    w = w.numpy()
    if module == ["lm_head"] or (module[-1] == "attn" and leaf in ("bias", "masked_bias")):
      continue  # the tied head; causal-mask buffers
    if module[-1] in ("wte", "wpe"):
      leaf = "embedding"
    elif module[-1].startswith("ln"):
      leaf = {"weight": "scale"}.get(leaf, leaf)
    elif leaf == "weight":
      leaf, w = "kernel", w.T
    out["/".join([*module, leaf])] = jnp.asarray(w)
  return nest(out)


def as_float64(tree):
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)


def relative(x, truth) -> float:
  """Largest deviation from ``truth`` in units of truth's RMS (the logits' scale)."""
  return float(np.abs(np.asarray(x, np.float64) - truth).max() / np.sqrt(np.mean(truth**2)))


def delta_error(lora, truth) -> float:
  """Worst relative Frobenius error of ``lora``'s ΔW against ``truth``'s, over kernels."""
  ref = {p: np.asarray(x.delta(), np.float64) for p, x in lora_leaves(as_float64(truth)).items()}
  got = {p: np.asarray(x.delta(), np.float64) for p, x in lora_leaves(as_float64(lora)).items()}
  return max(np.linalg.norm(got[p] - ref[p]) / np.linalg.norm(ref[p]) for p in ref)


@needs_peft
def test_gpt2_fan_in_fan_out_matches_peft(tmp_path):
  """PEFT LoRAs with fan_in_fan_out on GPT-2's Conv1D (Flax kernels stored (out, in)).

  In float64 the library's import and transposed ΔW give torch peft's logits to 1e-14 of their
  scale, and an exported task is exactly what torch peft runs from its files: the implementations
  agree. What is left is float32 storage: Share keeps tasks in float32 bases, whose ΔW differ from
  the adapters' by 5e-7 (float32 SVD round-off), which this small GPT-2 (adapters ~10× its
  weights) amplifies into ~1e-5 of the logits' scale (~1e-6 absolute): the same gap with a
  float64 forward as with float32 serving or torch peft in float32 on the exported files. (Torch
  peft's own float32 forward of the original adapter is ~2e-6 of the scale off; 1e-7 relative
  noise on its lora_B moves the float64 logits by 1e-6 of their scale.)
  """
  import torch
  from peft import PeftModel
  from transformers import FlaxGPT2LMHeadModel, GPT2Config, GPT2LMHeadModel

  config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
  torch.manual_seed(0)
  torch_base = GPT2LMHeadModel(config).eval()
  ids = np.random.default_rng(0).integers(0, 64, (3, 8))

  def torch_logits(adapter_dir, dtype=torch.float64):
    model = PeftModel.from_pretrained(copy.deepcopy(torch_base), adapter_dir).eval().to(dtype)
    with torch.no_grad():
      return model(torch.from_numpy(ids)).logits.numpy().astype(np.float64)

  params = gpt2_flax_params(torch_base)
  assert params["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"].shape == (128, 32)  # (out, in)
  cfg = dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
  truth, loras = [], []
  for seed in range(2):
    peft_wrap(copy.deepcopy(torch_base), tmp_path / f"in{seed}", seed, **cfg)
    truth.append(torch_logits(tmp_path / f"in{seed}"))
    adapter = read_adapter(tmp_path / f"in{seed}", params=params)
    loras.append(adapter.lora)
  assert adapter.shapes["transformer/h/1/attn/c_attn/kernel"] == (96, 32)

  sub = sj.init_subspace(params, loras, k=4, center=False)  # two rank-2 tasks: lossless
  assert sub.layout.spec("transformer/h/0/attn/c_attn/kernel").transposed
  exported = []
  for t in range(2):
    assert delta_error(sj.reconstruct(sub, t), loras[t]) < 2e-6  # float32 round-off
    export_task(sub, t, tmp_path / f"out{t}")
    exported.append(read_adapter(tmp_path / f"out{t}", params=params).lora)
    assert delta_error(exported[t], sj.reconstruct(sub, t)) < 1e-6
    assert relative(torch_logits(tmp_path / f"out{t}", torch.float32), truth[t]) < 5e-5

  model32 = FlaxGPT2LMHeadModel(config, _do_init=False)
  tasks = [1, 0, 1]
  mixed = jax.jit(
    lambda x, i: mixed_task_apply(
      lambda v, y: model32(y, params=v).logits, params, sub, i, x, prefix=""
    )
  )(jnp.asarray(ids), task_indices(sub, tasks))
  for i, t in enumerate(tasks):
    assert relative(mixed[i], truth[t][i]) < 5e-5

  with jax.enable_x64(True):
    model64 = FlaxGPT2LMHeadModel(config, dtype=jnp.float64, _do_init=False)
    run64 = jax.jit(lambda p, x: model64(x, params=p).logits)
    params64 = as_float64(params)
    for t in range(2):
      logits = run64(sj.apply_lora(params64, as_float64(loras[t])), ids)
      assert logits.dtype == jnp.float64
      assert relative(logits, truth[t]) < 1e-12
      back = run64(sj.apply_lora(params64, as_float64(exported[t])), ids)
      assert relative(back, torch_logits(tmp_path / f"out{t}")) < 1e-12
      assert relative(run64(sj.task_params(params64, sub, t), ids), truth[t]) < 5e-5


def test_checkpoint_keeps_kernel_layouts(tmp_path):
  """Conv and transposed kernels come back from a checkpoint with their stored layout."""
  from share_jax.checkpoint import Checkpointer

  params = {"conv": {"kernel": jnp.zeros((3, 3, 2, 4))}, "c1d": {"kernel": jnp.zeros((6, 5))}}
  rng = np.random.default_rng(0)
  lora = {
    "conv": {"kernel": LoRA(jnp.asarray(rng.normal(size=(18, 2))), jnp.ones((2, 4)))},
    "c1d": {
      "kernel": LoRA(jnp.ones((5, 2)), jnp.asarray(rng.normal(size=(2, 6))), transposed=True)
    },
  }
  sub = sj.init_subspace(params, [lora], k=2)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(sub)
    back = ckpt.restore()
  assert back.layout == sub.layout
  assert back.layout.spec("c1d/kernel").stored_shape == (6, 5)
  want = flatten_with_paths(sj.task_params(params, sub, 0))
  got = flatten_with_paths(sj.task_params(params, back, 0))
  for p in want:
    np.testing.assert_allclose(got[p], want[p], atol=1e-6)
