"""kvpool vLLM connector."""
