"""capt_lib.prompts stage."""
