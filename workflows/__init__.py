"""Workflows: the canvases (chains, groups, chords) that compose tasks into ASR jobs."""
