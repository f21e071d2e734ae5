"""`asr worker|beat|api|flower`: start each process with the right queues and settings (issue 5)."""
