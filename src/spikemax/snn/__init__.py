"""The spiking network: `network` (ConvSNN), `lif` (its fused LIF kernel), `training` (the Lightning
module, checkpoint callback, `build`), `checkpoints` (names, schedule, discovery, `load_snn`).

Every name is re-exported here: `from spikemax.snn import ConvSNN, load_snn, checkpoints, ...`.
"""

from spikemax.snn.checkpoints import (
    CKPT_PATTERN,
    CSV_COLUMNS,
    LEGACY_PATTERN,
    MAX_CHECKPOINTS,
    Progress,
    checkpoint_files,
    checkpoint_name,
    checkpoints,
    load_snn,
    progress,
    schedule_steps,
)
from spikemax.snn.lif import SYNAPSE_CHUNK
from spikemax.snn.network import ConvSNN, HParams
from spikemax.snn.training import ConvSNNLitModule, EpochRecorder, build, evaluate, spike_count_loss, untrained

__all__ = [
    "CKPT_PATTERN",
    "CSV_COLUMNS",
    "LEGACY_PATTERN",
    "MAX_CHECKPOINTS",
    "SYNAPSE_CHUNK",
    "ConvSNN",
    "ConvSNNLitModule",
    "EpochRecorder",
    "HParams",
    "Progress",
    "build",
    "checkpoint_files",
    "checkpoint_name",
    "checkpoints",
    "evaluate",
    "load_snn",
    "progress",
    "schedule_steps",
    "spike_count_loss",
    "untrained",
]
