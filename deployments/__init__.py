"""Prefect deployments of the recipe flows: schedules, parameters, work pools."""
