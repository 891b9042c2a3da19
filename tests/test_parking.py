"""engine/parking.py: barrier state parked in memory or on disk, and the chunk tracker's reach."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.engine import prune_tiny_sparsegpt as _prune_tiny_sparsegpt
from tests.helpers.engine import read_output as _read_output
from tests.helpers.engine import watch_statistics_and_solves as _watch_statistics_and_solves


def test_chunk_tracker_only_when_parking_and_never_around_our_own_code(tiny_models, corpus_file, tmp_path):
    """The chunk tracker (a Python dispatch mode) is installed only when barrier state is parked, and
    our own code in the hooks leaves it: a SparseGPT solve is thousands of small ops, each of which
    would otherwise pass through Python. With every storage parked (min_bytes 1), disk parking still
    finds the chunks' state, and the result is bit-identical to keeping it in memory."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from llmprune.engine.parking import ChunkTracker, Parking

    folder = tiny_models("llama", layers=2)
    park_one, alive = Parking.park, ChunkTracker.alive

    def run(park: str) -> tuple[list, set, int, list[int]]:
        in_forward: set[type] = set()
        parked: list[int] = []
        tracked: list[int] = []

        def counting_park(self, tensor):
            result = park_one(self, tensor)
            parked.append(result.nbytes if result is not None else 0)
            return result

        def counting_alive(self):
            storages = alive(self)
            tracked.append(len(storages))
            return storages

        def linear_mode(module, args, output):
            if isinstance(module, nn.Linear):
                in_forward.add(type(_get_current_dispatch_mode()))

        handle = nn.modules.module.register_module_forward_hook(linear_mode)
        try:
            with pytest.MonkeyPatch.context() as patch:
                ours = _watch_statistics_and_solves(patch, _get_current_dispatch_mode)
                patch.setattr(Parking, "park", counting_park)
                patch.setattr(ChunkTracker, "alive", counting_alive)
                patch.setattr(Parking.__init__, "__defaults__", Parking.__init__.__defaults__[:-1] + (1,))
                patch.setattr(ChunkTracker.__init__, "__defaults__", (1,))
                _prune_tiny_sparsegpt(folder, corpus_file, tmp_path / park, park=park, order="sequential")
        finally:
            handle.remove()
        return ours, in_forward, sum(parked), tracked

    for park in ("memory", "disk"):
        ours, in_forward, parked, tracked = run(park)
        assert {name for name, _ in ours} == {"add", "prune"}
        assert all(mode is None for _, mode in ours), ours
        if park == "memory":
            assert in_forward == {type(None)} and parked == 0 and not tracked
        else:  # every barrier (q/k/v, o, gate/up, down of each layer, each chunk) finds state to park
            assert ChunkTracker in in_forward and parked > 0
            assert len(tracked) == 2 * 4 * 2 and all(tracked), tracked
    memory, disk = _read_output(tmp_path / "memory"), _read_output(tmp_path / "disk")
    assert memory.keys() == disk.keys() and all(torch.equal(memory[k], disk[k]) for k in memory)
