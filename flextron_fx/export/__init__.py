"""Stage: export. Materialised dense models and elastic checkpoints."""
