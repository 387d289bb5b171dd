"""The providers the simulator speaks, by their value (`openai`, ...), in the order they are listed.

The app, the control API and `base_urls` read this mapping when they run, so a provider added to it
(a new module, or a test's temporary one) is served, controlled and pointed at like the others.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.provider_simulator.anthropic import Anthropic
from services.provider_simulator.base import SimulatedProvider
from services.provider_simulator.gemini import Gemini
from services.provider_simulator.groq import Groq
from services.provider_simulator.openai import OpenAI

SIMULATED: Mapping[str, SimulatedProvider] = {p.name: p for p in (OpenAI(), Groq(), Anthropic(), Gemini())}
