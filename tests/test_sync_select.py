"""--update-weight-transport auto: which transport each placement gets (a named transport is kept as given)."""

from streamrl.config import default_args
from streamrl.sync.select import resolve


def test_auto_picks_by_placement_and_names_win():
    auto = default_args()
    assert resolve(auto, on_cuda=True, shares_gpu=True) == "ipc"  # one card: CUDA IPC, no host copy
    assert resolve(auto, on_cuda=True, shares_gpu=False) == "pinned"  # other GPUs: measured host path
    assert resolve(auto, on_cuda=False) == "http"
    for name in ("distributed", "pinned", "http", "disk"):  # NCCL only when asked for, until measured on GPUs
        assert resolve(default_args(update_weight_transport=name), on_cuda=True, shares_gpu=False) == name
