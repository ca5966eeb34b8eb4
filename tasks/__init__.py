"""Prefect tasks: each a thin, typed wrapper over one SDK operation or one algorithm step."""
