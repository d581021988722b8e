"""Expert banks larger than device memory: every expert in host memory, ``slots`` of them on the device.

As S-LoRA pages adapters (Sheng et al. 2023, arXiv:2311.03285), a route first makes the experts its
batch uses resident: each that is not yet on the device is copied from (pinned) host memory into a
free slot, or into the slot of the least recently used expert that no active route holds. While a
route is active its experts stay (``acquire`` ... ``release``), so nested routes cannot evict each
other's; a batch may use at most ``slots`` distinct keys of one bank, fewer where other active routes
hold slots. The copies are the cost of a key's first use; a resident key costs nothing more than in
an unpaged bank.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import torch

from adaplex.errors import AdapterNameError
from adaplex.methods import ExpertBank


class ExpertPager:
    """Which experts of one bank are on the device, least recently used first."""

    def __init__(self, name: str, banks: list[ExpertBank], keys: tuple[str, ...], slots: int) -> None:
        if not 1 <= slots <= len(keys):
            raise AdapterNameError(f"bank {name!r} has {len(keys)} experts: page it with 1 to {len(keys)} slots")
        self.name, self.banks, self.keys, self.slots = name, banks, keys, slots
        self.resident: OrderedDict[int, int] = OrderedDict()  # expert index -> its slot
        self.held: Counter[int] = Counter()  # expert index -> active routes that use it
        self.loads = 0  # experts copied to the device so far
        for bank in banks:
            bank.page(slots)

    def acquire(self, index: list[int]) -> None:
        """Make the experts of ``index`` (each sample's, -1: none) resident and hold them until ``release``."""
        wanted = dict.fromkeys(k for k in index if k >= 0)
        others = {k for k in self.held if k not in wanted}  # held by other active routes
        if len(wanted) + len(others) > self.slots:
            raise AdapterNameError(
                f"the batch uses {len(wanted)} keys of bank {self.name!r}, which keeps {self.slots} on the device"
                + (f" ({len(others)} held by other active routes)" if others else "")
                + "; split the batch or page the bank with more slots"
            )
        self._load(wanted, others)
        self.held.update(wanted.keys())

    def release(self, index: list[int]) -> None:
        self.held.subtract({k for k in index if k >= 0})
        self.held = +self.held  # drops the experts no active route holds

    def _load(self, wanted: dict[int, None], others: set[int]) -> None:
        """Copy the experts of ``wanted`` that are not resident into free slots, or into those of the least
        recently used experts in neither ``wanted`` nor ``others``; then every bank's slot table."""
        for k in wanted:
            if k in self.resident:
                self.resident.move_to_end(k)
        missing = [k for k in wanted if k not in self.resident]
        if not missing:
            return
        free = sorted(set(range(self.slots)) - set(self.resident.values()))
        for k in missing:
            if free:
                slot = free.pop(0)
            else:  # the least recently used expert that neither this batch nor an active route uses
                victim = next(v for v in self.resident if v not in wanted and v not in others)
                slot = self.resident.pop(victim)
            for bank in self.banks:
                bank.load_slot(slot, k)
            self.resident[k] = slot
        table = torch.full((len(self.keys),), -1, dtype=torch.long)
        for k, slot in self.resident.items():
            table[k] = slot
        for bank in self.banks:
            bank.slot_of.copy_(table)
        self.loads += len(missing)
