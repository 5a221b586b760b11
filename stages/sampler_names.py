"""The names of the flow-matching samplers, apart from their torch code in `stages.samplers`.

The request schema (`stages.params`) validates the `sampler` field against these names, and the HTTP
ingress and the engine import that schema; keeping the names here lets them do so without torch.
"""

from __future__ import annotations

from typing import Literal, get_args

SamplerName = Literal["unipc", "euler", "dpm++"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
DEFAULT_SAMPLER: SamplerName = "unipc"
