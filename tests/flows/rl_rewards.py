"""Rewards for the RL flow tests, loaded by name (`reward="tests.flows.rl_rewards:<name>"`).

A random-init model never earns a task's reward, so every group would be constant and nothing
would train; `parity` gives random completions rewards that differ within a group. The others
fail on purpose, on one row.
"""

from __future__ import annotations

from algorithms.rl_data import PromptRow


def parity(completion_text: str, row: PromptRow) -> float:
    """1.0 when the completion's characters sum to an even code point total, else 0.0."""
    return float(sum(map(ord, completion_text)) % 2 == 0)


def raises_on_four(completion_text: str, row: PromptRow) -> float:
    """Raises for the prompt `4+…`; `parity` elsewhere."""
    if row.prompt[-1].content.startswith("4+"):
        raise ArithmeticError("no fours here")
    return parity(completion_text, row)


def nan_on_four(completion_text: str, row: PromptRow) -> float:
    """NaN for the prompt `4+…`; `parity` elsewhere."""
    return float("nan") if row.prompt[-1].content.startswith("4+") else parity(completion_text, row)
