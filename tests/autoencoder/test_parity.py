"""Numerical parity of the Flax autoencoder with diffusers' PyTorch modules (random weights, save_pretrained)."""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lpl_jax import autoencoder as ae

TOL = 1e-4
KINDS = ('kl', 'kl16', 'asym')


def rel_err(actual, expected) -> float:
  """max |a - e| / max |e|: the error relative to the tensor's scale (elementwise ratios blow up near zeros)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def torch_features(vae, z, num_blocks, apply_post_quant_conv):
  """diffusers' own decoder forward, with the outputs of mid_block and up_blocks captured by forward hooks."""
  captured = []
  hooks = [
    m.register_forward_hook(lambda _m, _i, out: captured.append(out))
    for m in [vae.decoder.mid_block, *vae.decoder.up_blocks[:num_blocks]]
  ]
  try:
    if apply_post_quant_conv and vae.post_quant_conv is not None:
      z = vae.post_quant_conv(z)
    vae.decoder(z)
  finally:
    for h in hooks:
      h.remove()
  return captured


@functools.cache
def _load(folder):
  return ae.from_diffusers(folder)


def _inputs(vae, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  f = 2 ** (len(vae.config.block_out_channels) - 1)
  x = rng.uniform(-1, 1, (batch, 8 * f // 2, 8 * f // 2, 3)).astype(np.float32)
  z = rng.normal(size=(batch, 4, 4, vae.config.latent_channels)).astype(np.float32)
  return x, z


@pytest.mark.parametrize('kind', KINDS)
def test_encode_decode_parity(diffusers_folder, kind):
  folder, vae = diffusers_folder(kind)
  model, params = _load(folder)
  x, z = _inputs(vae)
  mean, logvar = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode))(params, x)
  recon = jax.jit(lambda p, z: model.apply({'params': p}, z, method=model.decode))(params, z)
  with torch.no_grad():
    dist = vae.encode(nchw(x)).latent_dist
    expected_recon = vae.decode(nchw(z)).sample
  chex.assert_shape(
    mean,
    (
      x.shape[0],
      x.shape[1] // 4 if kind != 'kl16' else x.shape[1] // 2,
      x.shape[2] // 4 if kind != 'kl16' else x.shape[2] // 2,
      vae.config.latent_channels,
    ),
  )
  assert rel_err(mean, nhwc(dist.mean)) <= TOL
  assert rel_err(logvar, nhwc(dist.logvar)) <= TOL
  assert rel_err(recon, nhwc(expected_recon)) <= TOL
  assert model.scaling_factor == vae.config.scaling_factor
  assert model.shift_factor == (vae.config.get('shift_factor') or 0.0)


@pytest.mark.parametrize('apply_post_quant_conv', [True, False])
@pytest.mark.parametrize('kind', KINDS)
def test_feature_tap_parity(diffusers_folder, kind, apply_post_quant_conv):
  folder, vae = diffusers_folder(kind)
  model, params = _load(folder)
  _, z = _inputs(vae, seed=1)
  n = model.config.num_up_blocks
  feats = jax.jit(lambda p, z: model.apply({'params': p}, z, n, apply_post_quant_conv, method=model.decoder_features))(
    params, z
  )
  with torch.no_grad():
    expected = torch_features(vae, nchw(z), n, apply_post_quant_conv)
  assert len(feats) == len(expected) == n + 1
  for i, (f, e) in enumerate(zip(feats, expected)):
    assert rel_err(f, nhwc(e)) <= TOL, f'feature {i}'


@pytest.mark.parametrize('kind', KINDS)
def test_feature_gradient_parity(diffusers_folder, kind):
  """d/dz of sum_l <f_l(z), r_l> against PyTorch autograd through diffusers' decoder."""
  folder, vae = diffusers_folder(kind)
  model, params = _load(folder)
  _, z = _inputs(vae, seed=2)
  n = model.config.num_up_blocks
  shapes = [
    f.shape for f in jax.eval_shape(lambda z: model.apply({'params': params}, z, n, method=model.decoder_features), z)
  ]
  rng = np.random.default_rng(3)
  probes = [rng.normal(size=s).astype(np.float32) for s in shapes]

  def scalar(z):
    feats = model.apply({'params': params}, z, n, method=model.decoder_features)
    return sum(jnp.sum(f * r) for f, r in zip(feats, probes))

  grad = jax.jit(jax.grad(scalar))(z)
  zt = nchw(z).requires_grad_(True)
  feats_t = torch_features(vae, zt, n, apply_post_quant_conv=True)
  sum(torch.sum(f * nchw(r)) for f, r in zip(feats_t, probes)).backward()
  assert rel_err(grad, nhwc(zt.grad)) <= TOL


def test_asymmetric_mask_conditioned_decode_parity(diffusers_folder):
  folder, vae = diffusers_folder('asym')
  model, params = _load(folder)
  x, z = _inputs(vae, seed=4)
  rng = np.random.default_rng(5)
  mask = (rng.uniform(size=x.shape[:3] + (1,)) > 0.5).astype(np.float32)
  out = jax.jit(lambda p, z, x, m: model.apply({'params': p}, z, x, m, method=model.decode))(params, z, x, mask)
  with torch.no_grad():
    expected = vae.decode(nchw(z), image=nchw(x), mask=nchw(mask)).sample
  assert rel_err(out, nhwc(expected)) <= TOL


def test_parity_detects_transposed_attention(diffusers_folder):
  """Attention projections are square: a transposed kernel passes every shape check, so parity must catch it."""
  folder, vae = diffusers_folder('kl')
  model, params = _load(folder)
  _, z = _inputs(vae, seed=6)
  flat = flax.traverse_util.flatten_dict(params)
  key = ('decoder', 'mid_block', 'attentions_0', 'to_q', 'kernel')
  assert flat[key].shape[0] == flat[key].shape[1]
  flat[key] = flat[key].T
  broken = flax.traverse_util.unflatten_dict(flat)
  feats = model.apply({'params': broken}, z, 0, method=model.decoder_features)
  with torch.no_grad():
    expected = torch_features(vae, nchw(z), 0, apply_post_quant_conv=True)
  assert rel_err(feats[0], nhwc(expected[0])) > 100 * TOL


def test_legacy_attention_names(diffusers_folder, tmp_path):
  """`query/key/value/proj_attn` checkpoints: diffusers itself loads the renamed file; so must we, identically."""
  from diffusers import AutoencoderKL
  from safetensors.numpy import load_file, save_file

  folder, vae = diffusers_folder('kl')
  state = load_file(f'{folder}/diffusion_pytorch_model.safetensors')
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  legacy = {}
  for name, value in state.items():
    for new, old in renames.items():
      name = name.replace(f'.{new}.', f'.{old}.')
    legacy[name] = value
  assert any('.proj_attn.' in k for k in legacy) and not any('.to_q.' in k for k in legacy)
  import shutil

  shutil.copy(f'{folder}/config.json', tmp_path / 'config.json')
  save_file(legacy, str(tmp_path / 'diffusion_pytorch_model.safetensors'))

  reloaded = AutoencoderKL.from_pretrained(str(tmp_path)).eval()
  model, params = ae.from_diffusers(tmp_path)
  _, z = _inputs(vae, seed=7)
  out = model.apply({'params': params}, z, method=model.decode)
  with torch.no_grad():
    assert rel_err(nhwc(reloaded.decode(nchw(z)).sample), nhwc(vae.decode(nchw(z)).sample)) == 0.0
    assert rel_err(out, nhwc(vae.decode(nchw(z)).sample)) <= TOL


@pytest.mark.parametrize('kind', ('kl', 'asym'))
def test_export_round_trip_through_diffusers(diffusers_folder, tmp_path, kind):
  """save_diffusers writes a folder that diffusers' from_pretrained reads and that computes the same function."""
  from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

  folder, vae = diffusers_folder(kind)
  model, params = _load(folder)
  ae.save_diffusers(tmp_path, model, params)
  cls = AsymmetricAutoencoderKL if kind == 'asym' else AutoencoderKL
  reloaded = cls.from_pretrained(str(tmp_path)).eval()
  _, z = _inputs(vae, seed=8)
  with torch.no_grad():
    assert rel_err(nhwc(reloaded.decode(nchw(z)).sample), nhwc(vae.decode(nchw(z)).sample)) == 0.0


def test_kl_divergence_matches_diffusers(diffusers_folder):
  from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

  folder, vae = diffusers_folder('kl')
  model, params = _load(folder)
  x, _ = _inputs(vae, seed=9)
  mean, logvar = model.apply({'params': params}, x, method=model.encode)
  with torch.no_grad():
    expected = vae.encode(nchw(x)).latent_dist.kl()
    moments = torch.cat([nchw(mean), nchw(logvar)], dim=1)
    assert rel_err(ae.kl_divergence(mean, logvar), DiagonalGaussianDistribution(moments).kl()) <= TOL
  assert rel_err(jax.jit(ae.kl_divergence)(mean, logvar), expected) <= TOL


@pytest.mark.parametrize('preset', sorted(ae.PRESETS))
def test_presets_are_the_diffusers_architectures(preset):
  """Each preset, written out as a diffusers config, builds a diffusers model whose every tensor name and shape the
  strict importer accepts (built on the meta device: no memory, no weights)."""
  from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

  from lpl_jax.autoencoder.convert import convert_state_dict

  model = ae.from_preset(preset)
  cls = AsymmetricAutoencoderKL if model.config.asymmetric else AutoencoderKL
  with torch.device('meta'):
    reference = cls.from_config(model.config.to_diffusers_config())
  state = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in reference.state_dict().items()}
  params = jax.eval_shape(lambda: convert_state_dict(state, model))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == sum(
    int(np.prod(v.shape)) for v in reference.state_dict().values()
  )
  assert reference.config.scaling_factor == model.scaling_factor
