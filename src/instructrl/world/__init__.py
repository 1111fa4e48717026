"""The embedded default world: generator, gold judge, simulated labelers, bias probes."""
from .generator import CHAT_TEMPLATE, WorldConfig, format_prompt, generate_world
from .judge import GoldJudge
from .labelers import SimulatedLabeler

__all__ = ["CHAT_TEMPLATE", "WorldConfig", "format_prompt", "generate_world", "GoldJudge", "SimulatedLabeler"]
