"""Attention fault injection (bit flips) and detection (invariant and checksum checks).

from adaplex.faults import DetectorConfig, armed, detections_of
with armed(model, None, DetectorConfig(fused=True)) as hooks:
    logits = model(input_ids=batch).logits
    found = detections_of(hooks)
"""

from adaplex.faults.graphed import GraphedForward
from adaplex.faults.hook import DetectorConfig, FaultPlan, detections_of
from adaplex.faults.session import armed

__all__ = ["DetectorConfig", "FaultPlan", "GraphedForward", "armed", "detections_of"]
