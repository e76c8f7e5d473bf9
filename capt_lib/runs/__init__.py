"""capt_lib.runs stage."""
