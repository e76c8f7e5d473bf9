"""capt_lib.training stage."""
