"""Argument dataclasses shared by several commands."""

from dataclasses import dataclass, field

from ..sampling import SamplingConfig


@dataclass
class SamplingArguments:
    """The sampling distribution as `--flags` (see `trl_t2i.sampling.SamplingConfig`); `sampling` validates them."""

    cfg_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale (1 disables it)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Top-k filtering (0 disables it)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus filtering (1.0 disables it)."})

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.cfg_scale, self.temperature, self.top_k, self.top_p)
