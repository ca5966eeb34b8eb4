"""One Prefect flow per recipe, sharing one lifecycle and the run ledger."""
