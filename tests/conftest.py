"""Test setup: 8 fake CPU devices (set before JAX is imported), a private cache dir, shared fixtures."""

import os
import tempfile

# The suite's programs are tiny, so XLA's compile time dominates: compiling them at LLVM's lowest optimisation
# level halves the time of compile-bound test files (tests/test_steps.py 57 -> 34 s) and changes no result.
# Subprocesses inherit the flags. Runs outside the suite keep XLA's defaults.
# The suite runs one pytest worker per core, so a worker's XLA runs its ops on one thread: Eigen's thread pool
# only spins against the other worker there (tests/test_generate.py + test_optim.py alone: 77 -> 68 s of CPU).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
                           ' --xla_cpu_multi_thread_eigen=false').strip()
os.environ.setdefault('JAXTRAIN_CACHE', tempfile.mkdtemp(prefix='jaxtrain-cache-'))
# Subprocess runs of the same config reuse compiled programs through JAX's persistent cache.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.environ['JAXTRAIN_CACHE'], 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('WANDB_MODE', 'disabled')

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def repo_root() -> str:
  return REPO


def pytest_configure(config):
  assert jax.device_count() == 8, f'expected 8 fake CPU devices, got {jax.device_count()}'
