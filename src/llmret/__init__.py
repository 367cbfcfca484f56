"""Library behind the workflow that rebuilds LLM-retriever papers (LLaRA, CSPLADE)."""

__version__ = "0.1.0"
