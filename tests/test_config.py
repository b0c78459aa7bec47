"""Config validation: the schema, the per-key tables, each feature's rules through `prepare`, and a prepared
config that is the input left alone. (The command line's and the library's one-line errors: test_main.py.)"""

import ml_collections
import pytest

from jaxtrain.config import schema, validate as config_lib
from jaxtrain.config.defaults import base_config
from jaxtrain.errors import ConfigError


def test_validate_messages_name_key_value_and_valid():
  c = base_config()
  c.model.num_heads, c.model.num_kv_heads = 6, 4
  with pytest.raises(ConfigError, match=r'config.model.num_kv_heads=4: must divide model.num_heads=6'):
    config_lib.prepare(c, '/tmp/x', 8)
  c = base_config()
  c.train.accum_steps = 3
  with pytest.raises(ConfigError, match=r'data.batch_size=8: must be divisible by train.accum_steps=3'):
    config_lib.prepare(c, '/tmp/x', 1)
  c = base_config()
  c.optim.no_decay = '(norm'  # (a warmup longer than train.steps is no error: it is clamped, with a note)
  with pytest.raises(ConfigError, match=r"optim.no_decay='\(norm': is not a valid regular expression"):
    config_lib.prepare(c, '/tmp/x', 1)
  raw = base_config().to_dict()
  raw['train']['steps'] = 1.5  # a config assembled from a dict bypasses ConfigDict's own type checks
  c = ml_collections.ConfigDict(raw)
  with pytest.raises(ConfigError, match=r'train.steps=1.5: must be an integer'):
    schema.check(c)


@pytest.mark.parametrize('changes, needle', [
    ({'norm': 'batchnorm'}, "model.norm='batchnorm': must be one of rmsnorm, layernorm"),
    ({'mlp': 'relu'}, "model.mlp='relu': must be one of swiglu, gelu, gelu_tanh"),
    ({'positions': 'learned'}, "model.max_positions=0: must be >= data.seq_len=256 with model.positions='learned'"),
    ({'rope_scaling': 'llama3', 'rope_high_freq_factor': 1.0},
     'model.rope_high_freq_factor=1.0: must be > model.rope_low_freq_factor=1.0'),
    ({'sliding_window': -2}, 'model.sliding_window=-2: must be >= 0'),
])
def test_architecture_keys_are_validated(changes, needle):
  c = base_config()
  c.model.update(changes)
  with pytest.raises(ConfigError, match=needle):
    config_lib.check_values(c, 1)


@pytest.mark.parametrize('key', ['optim.no_decay', 'lora.targets'])
def test_every_regex_key_is_compiled_at_validation(key, tmp_path):
  c = base_config()
  section, name = key.split('.')
  c[section][name] = 'attn/(q'
  with pytest.raises(ConfigError, match=rf"config.{key}='attn/\(q': is not a valid regular expression"):
    config_lib.prepare(c, str(tmp_path / 'w'), 8)


def test_prepare_returns_a_copy_and_leaves_the_input_alone(tmp_path):
  c = base_config()
  c.lock()
  before = c.to_dict()
  out = config_lib.prepare(c, str(tmp_path / 'w'), 8)
  assert out is not c and out.is_locked and out.to_dict() == before == c.to_dict()
  assert not (tmp_path / 'w').exists()  # the workdir probe leaves nothing behind
