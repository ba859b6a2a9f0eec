"""Running studies: storage URLs, the trial evaluator, and the local backend."""
