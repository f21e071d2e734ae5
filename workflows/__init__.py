"""Workflows: the job engine (engine/), the job kinds that define every ASR job (kinds/), and what they share:
the action catalog, item loading, stage fragments, outcomes, the scheduler, settings."""
