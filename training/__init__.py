"""Training scripts for ToCom banks (installed as ``tocom_hub.training``)."""
