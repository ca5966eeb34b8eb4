"""Prefect deployments of the recipe flows: schedules, parameters, work pool, serving.

`deployments.catalog.CATALOG` declares them (sft/sft-nightly, rl/rl-weekly, dpo/dpo-on-demand,
orpo/orpo-on-demand; entrypoints flows/<recipe>.py:<recipe>_flow; work pool `fireloop`);
`fireloop serve` serves them, and `prefect.yaml` (generated) deploys them to the work pool.
"""
