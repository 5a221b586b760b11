"""The names of the flow-matching samplers, apart from their torch code in `stages.samplers`.

The request schema (`stages.params`) types the `sampler` field with every name here, and the HTTP
ingress and the engine import that schema; keeping the names here lets them do so without torch. Which
of them a model offers is its family's choice (`ModelDescription.samplers`: Wan unipc / dpm++ / euler,
FLUX.1 flowmatch-euler); a request naming another is refused at resolution.
"""

from __future__ import annotations

from typing import Literal, get_args

SamplerName = Literal["unipc", "euler", "dpm++", "flowmatch-euler"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
DEFAULT_SAMPLER: SamplerName = "unipc"
