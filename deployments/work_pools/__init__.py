"""Base job templates of fireloop's Docker and Kubernetes work pools (`templates.py` builds
them from the workers' own defaults; the JSON files beside it are what `prefect work-pool
create --base-job-template` reads)."""
