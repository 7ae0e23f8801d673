import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _on_gpu(value) -> bool:
    return (isinstance(value, str) and value.startswith("cuda")) or (
        isinstance(value, torch.device) and value.type == "cuda"
    )


def pytest_collection_modifyitems(items):
    """Every test that runs on a GPU carries the ``cuda`` marker, so ``-m cuda`` (the GPU check,
    tools/gpu_check.sh) selects them all: those marked by hand, those parametrized with a CUDA
    device, and those whose name says they are for CUDA."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "cuda" in item.name.lower() or any(_on_gpu(v) for v in params.values()):
            item.add_marker(pytest.mark.cuda)
