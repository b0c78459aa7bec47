"""Mesh resolution, logical-axis rules and the shardings of optimizer state."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxtrain import sharding


def test_mesh_shape_resolves_minus_one_and_rejects_mismatch():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({'data': 2, 'fsdp': 2, 'tensor': 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match='uses 4 devices but 8'):
    sharding.mesh_shape({'data': 2, 'fsdp': 2, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='does not divide'):
    sharding.mesh_shape({'data': -1, 'fsdp': 3, 'tensor': 1}, 8)


def test_spec_for_replicates_indivisible_dims():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  assert sharding.spec_for(('embed', 'mlp'), (32, 64), mesh) == P('fsdp', 'tensor')
  assert sharding.spec_for(('embed', 'kv_heads', 'head_dim'), (32, 1, 8), mesh) == P('fsdp', None, None)
  assert sharding.spec_for(('batch', 'seq'), (8, 16), mesh) == P(('data', 'fsdp'), None)
  with pytest.raises(KeyError, match='no sharding rule'):
    sharding.spec_for(('bogus',), (4,), mesh)


def test_optimizer_moments_follow_their_parameters():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  params = {'a': {'kernel': jnp.zeros((8, 4))}, 'b': jnp.zeros((4,))}
  specs = {'a': {'kernel': P('embed', 'mlp')}, 'b': P('norm')}
  psh = sharding.param_shardings(specs, params, mesh)
  opt_state = ({'mu': params, 'count': jnp.zeros(())},)
  osh = sharding.shardings_like(opt_state, params, psh, mesh)
  assert osh[0]['mu']['a']['kernel'].spec == P('fsdp', 'tensor')
  assert osh[0]['mu']['b'].spec == P(None)
  assert osh[0]['count'].spec == P()


def test_constrain_is_noop_without_mesh_and_shards_within_one():
  x = jnp.ones((8, 4))
  assert sharding.constrain(x, ('batch', 'act_embed')) is x
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  with jax.set_mesh(mesh):
    y = jax.jit(lambda a: sharding.constrain(a * 2, ('batch', 'act_embed')))(x)
  assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(('data', 'fsdp'), None)), 2)
  assert len(y.addressable_shards) == 8 and y.addressable_shards[0].data.shape == (1, 4)
