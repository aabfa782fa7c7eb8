import gc
import weakref

import pytest
import torch

from t2mv.residency import StageSlot, auto_low_memory


def test_loader_slot_builds_per_use_and_frees_after():
    built: list[weakref.ref] = []

    def loader():
        module = torch.nn.Linear(4, 4)
        built.append(weakref.ref(module))
        return module

    slot = StageSlot("toy", loader=loader, dtype=torch.float32)
    assert slot.present and not slot.resident
    for _ in range(2):
        name = slot.run(torch.device("cpu"), lambda stage: (type(stage).__name__, built[-1]() is stage))
        assert name == ("Linear", True)
        assert built[-1]() is None  # nothing of the stage survives the call (run collects garbage itself)
    assert len(built) == 2


def test_loader_slot_frees_when_the_block_fails():
    ref: list[weakref.ref] = []

    def loader():
        module = torch.nn.Linear(2, 2)
        ref.append(weakref.ref(module))
        return module

    slot = StageSlot("toy", loader=loader)

    def boom(stage):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        slot.run(torch.device("cpu"), boom)
    gc.collect()
    assert ref[0]() is None


def test_resident_slot_keeps_the_same_stage():
    module = torch.nn.Linear(2, 2)
    slot = StageSlot("toy", stage=module)
    a = slot.run(torch.device("cpu"), lambda stage: stage)
    b = slot.run(torch.device("cpu"), lambda stage: stage, offload=True)
    assert a is b is module


def test_slot_rejects_both_and_reports_missing():
    with pytest.raises(ValueError, match="not both"):
        StageSlot("toy", stage=object(), loader=object)
    empty = StageSlot("toy")
    assert not empty.present
    with pytest.raises(RuntimeError, match="no toy stage"):
        empty.run(torch.device("cpu"), lambda stage: None)


@pytest.mark.parametrize(
    ("device", "dtype", "available", "expected"),
    [
        ("cpu", torch.float32, 8.0, True),
        ("cpu", torch.float32, 20.0, False),
        ("cpu", torch.bfloat16, 8.0, False),  # bf16 halves what the resident chain needs
        ("cpu", torch.bfloat16, 5.0, True),
        ("cuda", torch.float16, 2.0, False),  # weights live on the GPU
    ],
)
def test_auto_low_memory(device, dtype, available, expected):
    assert auto_low_memory(torch.device(device), dtype, available_gib=available) is expected
