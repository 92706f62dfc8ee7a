"""Which device a model may run on here (core.devices.check_device)."""

from __future__ import annotations

import pytest
import torch

from tts_workbench.core.devices import check_device
from tts_workbench.core.errors import SourceError


def test_a_cuda_index_this_machine_does_not_have_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # before, cuda:3 on a one-GPU machine passed, to fail later at the first tensor put there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda", 0)
    assert check_device("cuda") == torch.device("cuda")
    with pytest.raises(SourceError, match=r"cuda:3.*1 GPU.*cuda:0"):
        check_device("cuda:3")
    with pytest.raises(SourceError, match=r"cuda:1.*1 GPU"):  # the first index past the last GPU
        check_device("cuda:1")


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_a_device_other_than_cpu_or_cuda_is_refused(device: str) -> None:
    # torch names them, but no model here runs there: refused now, not at the first kernel
    with pytest.raises(SourceError, match=f"{device!r} is not supported"):
        check_device(device)
