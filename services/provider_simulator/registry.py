"""The providers the simulator speaks, by their value (`openai`, ...), in the order they are listed."""

from __future__ import annotations

from collections.abc import Mapping

from services.provider_simulator.anthropic import Anthropic
from services.provider_simulator.base import SimulatedProvider
from services.provider_simulator.gemini import Gemini
from services.provider_simulator.groq import Groq
from services.provider_simulator.openai import OpenAI

SIMULATED: Mapping[str, SimulatedProvider] = {p.name: p for p in (OpenAI(), Groq(), Anthropic(), Gemini())}
PROVIDERS = tuple(SIMULATED)
MODELS = {name: p.models for name, p in SIMULATED.items()}
