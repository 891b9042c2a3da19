"""The structured methods, by name: one line each."""

from llmprune.structured.base import StructuredMethod
from llmprune.structured.fisher import Fisher
from llmprune.structured.scores import Flap, L2Structured

STRUCTURED: dict[str, type[StructuredMethod]] = {
    Fisher.name: Fisher,
    Flap.name: Flap,
    L2Structured.name: L2Structured,
}
