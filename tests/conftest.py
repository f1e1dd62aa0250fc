import os
import sys

import pytest

# the suite runs several processes at once on few cores (torchrun ranks, compare jobs, CLI
# subprocesses): OpenMP threads that sleep as soon as they wait leave the cycles to the others
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# without a GPU, Triton's kernels (losses/_triton.py) run in its CPU interpreter, which has to
# be chosen before Triton is first imported
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # the reference implementations live beside tests


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A folder with the built-in digits prepared, as $SOFTTRIPLE_DATA for the module."""
    root = tmp_path_factory.mktemp("data")
    patch = pytest.MonkeyPatch()
    patch.setenv("SOFTTRIPLE_DATA", str(root))
    from softtriple.data.builtin import prepare
    prepare("digits", root)
    yield root
    patch.undo()


@pytest.fixture(autouse=True)
def _kernel_settings_restored():
    """run.deterministic sets process-wide kernel flags; each test starts from torch's own."""
    import torch

    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]
